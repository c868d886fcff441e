"""Real Celery producer and kombu's own depth count, for the demo and the tests.

  python produce.py register N             N x the seed's register_user (3 tasks each)
  python produce.py send TASK N [PRIO]     N x TASK with .delay(), or apply_async(priority=PRIO)
  python produce.py sendq QUEUE N           N x page_oncall sent explicitly to QUEUE
  python produce.py later QUEUE N SECONDS   N x page_oncall to QUEUE with countdown=SECONDS (ETA)
  python produce.py ids QUEUE N PREFIX      N x record to QUEUE with task ids PREFIX0..PREFIX{N-1}
  python produce.py slow QUEUE N            N x run_ai_text_generation (10.6 s x TASK_SCALE) to QUEUE
  python produce.py inspect                 Celery's own view of its workers: tasks active,
                                            reserved (prefetched) and scheduled (ETA), one JSON line
  python produce.py count QUEUE...         kombu's message_count per queue, one JSON line each
"""
import json
import sys

from kombu.exceptions import ChannelError

from app.worker import app
from app.worker.tasks import ai_tasks, demo_tasks, emails, reports, urgent  # noqa: F401  (register tasks)


def register_user(user_id):
    """The seed's business example: one fast mail, one slow profile, one fast stats update."""
    demo_tasks.send_welcome_email.delay(f"user{user_id}@example.com")
    ai_tasks.generate_user_profile.delay(user_id)
    demo_tasks.update_user_statistics.delay(user_id)


def kombu_count(queue):
    """What kombu itself reports (Channel._size over every priority list)."""
    with app.connection_for_write() as conn:
        try:
            return conn.default_channel.queue_declare(queue=queue, passive=True).message_count
        except ChannelError:  # kombu raises for a queue with no keys: that is 0 messages
            return 0


def main(argv):
    cmd = argv[1]
    if cmd == "register":
        for i in range(int(argv[2])):
            register_user(i)
    elif cmd == "send":
        task = app.tasks[argv[2]]
        for i in range(int(argv[3])):
            if len(argv) > 4:
                task.apply_async(args=_args(task, i), priority=int(argv[4]))
            else:
                task.delay(*_args(task, i))
    elif cmd == "sendq":
        for i in range(int(argv[3])):
            urgent.page_oncall.apply_async(args=(i,), queue=argv[2])
    elif cmd == "later":
        for i in range(int(argv[3])):
            urgent.page_oncall.apply_async(args=(i,), queue=argv[2], countdown=int(argv[4]))
    elif cmd == "ids":
        for i in range(int(argv[3])):
            demo_tasks.record.apply_async(queue=argv[2], task_id=f"{argv[4]}{i}")
    elif cmd == "slow":
        for i in range(int(argv[3])):
            ai_tasks.run_ai_text_generation.apply_async(args=(f"prompt {i}",), queue=argv[2])
    elif cmd == "inspect":
        inspect = app.control.inspect(timeout=3)
        counts = {}
        for what in ("active", "reserved", "scheduled"):
            replies = getattr(inspect, what)() or {}
            counts[what] = sum(len(tasks) for tasks in replies.values())
        counts["workers"] = len(inspect.ping() or {})
        print(json.dumps(counts))
    elif cmd == "count":
        for q in argv[2:]:
            print(json.dumps({"queue": q, "pending": kombu_count(q)}))
    else:
        sys.exit(f"unknown command {cmd!r}; see the module docstring")


def _args(task, i):
    return {"simple_calculation": (i, i), "run_ai_text_generation": (f"prompt {i}",)}.get(task.name.rsplit(".", 1)[1], (i,))


if __name__ == "__main__":
    main(sys.argv)
