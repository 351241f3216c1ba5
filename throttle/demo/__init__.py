"""`throttle demo`: the seed's e-commerce burst through the throttle, shown live, with the
sessions' model calls (the LLM tool) when the config declares it.

Without THROTTLE_REDIS_URL it runs embedded, in one process (memory broker, in-process worker,
fakeredis running the gate's Lua); with it, on that Redis with one worker process per tool.

  seed      the seed's scenario and tool bodies, driven by name from `workers/`
  configs   the demo's tools only, with time scaled
  stack     what the demo runs on; embedded / real build one (real: the workers' config file)
  upstream  the stub model API the LLM tool calls (`throttle stub-llm`, a subprocess)
  tracker   outcomes from the results, admission times from the gate's logs (tools, pools)
  live      banner and live table;  report / chart  the summary (per tool, per pool and
            priority class), its JSON and PNG
  runner    ties them together
"""

from throttle.demo.real import DemoError
from throttle.demo.runner import DemoSettings, run_demo

__all__ = ["DemoError", "DemoSettings", "run_demo"]
