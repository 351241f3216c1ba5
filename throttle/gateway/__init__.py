"""An OpenAI-compatible HTTP gateway over the throttled tools (`throttle gateway`).

`POST /v1/chat/completions` turns each request into a call of a throttle tool, published on
the tool's queue like any `.delay()`, and answers once a worker ran it: the completion, a
429 with Retry-After and the tool's fallback when the gate falls back (a 400 when the call
alone costs more than a limit allows), or the upstream's own error. Limits apply to the
tenant the caller's key proves. Waiting requests hold no thread. See docs/gateway.md.

  callers   API key -> tenant (THROTTLE_GATEWAY_KEYS); the session_id / tenant arguments
  chat      request -> ChatCall (which tool, which arguments); result -> chat.completion
  errors    OpenAI's error format; a failed call's exception -> status and message
  service   Gateway: publish, await the result (throttle.waiter.ResultWaiter), answer
  retry     the 429's Retry-After, read from the gate's keys
  app       FastAPI routes (`make_app(GatewaySettings(...))`); metrics: Prometheus
  command   `throttle gateway` (FastAPI and uvicorn load only when it runs)
"""
