"""Baseline apps the product is measured against, each runnable on its own.

* ``echo``: bare Starlette and FastAPI + pydantic endpoints that parse the JSON body
  and answer 200 (uvicorn, one worker, access log off): the cost of the framework alone.
* ``naive_webhook``: Flask under gunicorn (2 sync workers), one upsert and commit per
  callback with PyMySQL: the seed design of the cloud side.
* ``naive_forward``: FastAPI publishing each callback with paho at QoS 1 inside the
  request: the seed design of the edge.
* ``raw_mqtt``: paho QoS 1 publisher and subscriber, no application code.
"""

__all__: list[str] = []
