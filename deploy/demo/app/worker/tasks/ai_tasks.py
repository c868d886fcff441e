"""Slow, CPU-heavy tasks (the seed's ai_processing queue). TASK_SCALE shortens them for tests."""
import os
import time

from app.worker import app

SCALE = float(os.environ.get("TASK_SCALE", "1"))


@app.task
def run_ai_text_generation(prompt):
    time.sleep(10.6 * SCALE)
    return f"generated text for {prompt!r}"


@app.task
def generate_user_profile(user_id):
    time.sleep(8 * SCALE)
    return {"user_id": user_id, "profile": "..."}
