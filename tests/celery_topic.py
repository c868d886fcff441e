"""A Celery app whose queue is bound to a topic exchange (tests/broker.rs).

Queue('feeds', Exchange('feeds', type='topic'), routing_key='feed.#'): tasks are sent to the
queue's exchange with routing key 'feed.import', so the message's routing key is not the queue's
name.

    python celery_topic.py send N COUNTDOWN   # N tasks held COUNTDOWN seconds by a worker
    celery -A celery_topic worker -Q feeds    # the worker that holds them
"""
import os
import sys

from celery import Celery
from kombu import Exchange, Queue

app = Celery("topic", broker=os.environ["CELERY_BROKER_URL"])
feeds = Exchange("feeds", type="topic")
app.conf.task_queues = [Queue("feeds", feeds, routing_key="feed.#")]


@app.task(name="feed.import")
def feed_import(i):
    return i


if __name__ == "__main__":
    if sys.argv[1] == "send":
        for i in range(int(sys.argv[2])):
            # As task_routes = {'feed.*': {'queue': 'feeds', 'routing_key': 'feed.import'}} would:
            # the producer declares the queue's topic exchange, and publishes to it.
            feed_import.apply_async(args=(i,), queue="feeds", routing_key="feed.import", countdown=int(sys.argv[3]))
