from app.worker import app


@app.task
def send_newsletter(address):
    return address
