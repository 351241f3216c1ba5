"""The deployable side: the Celery app with the seed's tools, their bodies and scenario.

    celery     the app and its `throttle`, built from the environment (Celery's layout)
    tools/     the tool bodies (catalog, llm; llm_tasks registers the LLM tool)
    scenario   the seed's assistant sessions and the calls they make
    produce    `python -m workers.produce`: send the scenario to deployed workers

`celery -A workers` finds `workers.celery.app`; importing a body or the scenario does not
build the app (the demo runs the same bodies on an app of its own).
"""

