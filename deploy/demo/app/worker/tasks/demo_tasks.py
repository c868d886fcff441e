"""Light, quick tasks (the seed's demo_tasks queue)."""
import json
import os
import time

from app.worker import app

SCALE = float(os.environ.get("TASK_SCALE", "1"))


@app.task
def simple_calculation(a, b):
    time.sleep(1.86 * SCALE)
    return a + b


@app.task
def send_welcome_email(email):
    time.sleep(1 * SCALE)
    return f"welcome mail to {email}"


@app.task
def update_user_statistics(user_id):
    time.sleep(1 * SCALE)
    return user_id


@app.task(bind=True)
def record(self):
    """Works for a second, then records its task id: the tests count which of the tasks they sent
    a real worker ran. In $TASK_RECORD_FILE (a worker process beside the test), or in the Redis
    hash $TASK_RECORD_KEY on the broker (worker pods), with the pod's name beside it; worker pods
    also append each start to the list $TASK_RECORD_KEY:starts (id, worker, time, redelivered)."""
    key = os.environ.get("TASK_RECORD_KEY")
    if key:
        start = {"id": self.request.id, "worker": self.request.hostname or "", "t": time.time(),
                 "redelivered": bool((self.request.delivery_info or {}).get("redelivered"))}
        with app.connection_for_write() as conn:
            conn.default_channel.client.rpush(f"{key}:starts", json.dumps(start))
    time.sleep(1 * SCALE)
    path = os.environ.get("TASK_RECORD_FILE")
    if path:
        with open(path, "a") as f:
            f.write(self.request.id + "\n")
    if key:
        with app.connection_for_write() as conn:
            conn.default_channel.client.hset(key, self.request.id, self.request.hostname or "")
