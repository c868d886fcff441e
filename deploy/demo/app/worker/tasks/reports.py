import os
import time

from app.worker import app


@app.task
def build_monthly_report(month):
    time.sleep(3 * float(os.environ.get("TASK_SCALE", "1")))
    return month
