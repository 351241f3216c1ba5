"""The message headers throttle writes on a tool call (a caller may write them too: the
worker reads them as claims, see throttle/intake.py)."""

ENQUEUED_AT = "throttle_enqueued_at"  # when the call was first due (sent, or its countdown/eta)
DEADLINE_S = "throttle_deadline_s"  # the caller's tighter deadline, seconds from ENQUEUED_AT
DELAYS = "throttle_delays"  # how often the gate has delayed the call
STORE_RETRIES = "throttle_store_retries"  # re-publishes while the gate's store was down
THROTTLE_HEADERS = (ENQUEUED_AT, DEADLINE_S, DELAYS, STORE_RETRIES)
