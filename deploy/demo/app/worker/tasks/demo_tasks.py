"""Light, quick tasks (the seed's demo_tasks queue)."""
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
    """Works for a second, then appends its task id to $TASK_RECORD_FILE: the fault suite counts
    which of the tasks it sent a real worker ran."""
    time.sleep(1 * SCALE)
    path = os.environ.get("TASK_RECORD_FILE")
    if path:
        with open(path, "a") as f:
            f.write(self.request.id + "\n")
