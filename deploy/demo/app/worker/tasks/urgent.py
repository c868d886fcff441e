from app.worker import app


@app.task
def page_oncall(message):
    return message
