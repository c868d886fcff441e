"""Demo driver: enqueue real Celery tasks, print pending, desired and ready worker pods per pool.

The pools run as real pods on the lab's node. Exits 0 once every task sent has run (counted by
the tasks themselves in the broker hash --count-key), every pool scaled up for the burst and came
back to its minReplicas with an empty queue; exits 1 if that does not happen within --timeout
seconds.
"""
import argparse
import json
import subprocess
import sys
import time

import produce

POOLS = ["urgent", "ai-processing", "demo-tasks", "general"]


def kubectl(*args):
    return json.loads(subprocess.run(["kubectl", *args, "-o", "json"], check=True, capture_output=True, text=True).stdout)


def send_burst(users):
    """The seed's register_user example, reports and urgent pages; returns how many tasks."""
    for i in range(users):
        produce.register_user(i)
    for i in range(9):
        produce.reports.build_monthly_report.delay(f"2026-{i + 1:02d}")
    for i in range(3):
        produce.urgent.page_oncall.delay(f"page {i}")
    return 3 * users + 9 + 3


def ran(key):
    """Tasks that ended on a worker, by the workers' own count (TASK_COUNT_KEY in the app)."""
    with produce.app.connection_for_write() as conn:
        return sum(int(v) for v in conn.default_channel.client.hgetall(key).values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--count-key", required=True)
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--timeout", type=int, default=420)
    ap.add_argument("--shot", help="also save a screenshot of --page (PNG) when the table is printed")
    ap.add_argument("--page", help="the operator's page, e.g. http://127.0.0.1:8080/")
    a = ap.parse_args()
    t0 = time.time()
    sent = 0
    shown = False
    peak = {p: 0 for p in POOLS}
    print(f"{'t':>5}  " + "  ".join(f"{p:>22}" for p in POOLS) + "   tasks")
    print(f"{'':>5}  " + "  ".join(f"{'pending/desired/ready':>22}" for _ in POOLS) + "   ran/sent")
    while time.time() - t0 < a.timeout:
        tqs = {t["metadata"]["name"]: t for t in kubectl("-n", a.namespace, "get", "taskqueues")["items"]}
        row, settled = [], True
        for p in POOLS:
            st = tqs.get(p, {}).get("status", {})
            pending, desired = st.get("pending"), st.get("desiredReplicas")
            peak[p] = max(peak[p], st.get("readyReplicas") or 0)
            row.append(f"{str(pending):>10}/{str(desired):>4}/{st.get('readyReplicas', 0):>5}")
            settled &= pending == 0 and desired == spec_min(tqs.get(p, {})) == st.get("readyReplicas", 0)
        done = ran(a.count_key)
        print(f"{time.time() - t0:5.0f}  " + "  ".join(f"{r:>22}" for r in row) + f"   {done:>3}/{sent}", flush=True)
        # The README's table: the first moment both pools the burst scales up run all the pods they
        # were asked for and still have work waiting.
        busy = ["ai-processing", "demo-tasks"]
        if sent and not shown and all(ready(tqs[p]) == wanted(tqs[p]) > 0 and pend(tqs[p]) > 0 for p in busy):
            subprocess.run(["kubectl", "-n", a.namespace, "get", "taskqueues"], check=False)
            if a.shot:
                screenshot(a.page, a.shot)
            shown = True
        if not sent:
            print(f"       -> {a.users} x register_user (the seed's example) + 9 reports + 3 urgent pages", flush=True)
            sent = send_burst(a.users)
        elif settled and done >= sent and all(peak[p] > spec_min(tqs[p]) for p in ["ai-processing", "demo-tasks"]):
            print(f"done after {time.time() - t0:.0f}s: {done} of {sent} tasks ran on the pools' pods, queues empty, "
                  f"every pool back at minReplicas; most ready pods per pool {peak}")
            return 0
        time.sleep(1)
    print(f"timeout after {a.timeout}s: {ran(a.count_key)} of {sent} tasks ran; most ready pods {peak}", file=sys.stderr)
    return 1


def screenshot(page, path):
    """Debian's headless Chromium; the virtual time budget lets the page fetch and draw."""
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                        "--hide-scrollbars", "--window-size=1500,900", "--virtual-time-budget=4000",
                        f"--screenshot={path}", page], capture_output=True, text=True, timeout=60)
    print(f"       screenshot of {page}: {path}" if r.returncode == 0 else f"       screenshot failed: {r.stderr[-400:]}",
          flush=True)


def spec_min(tq):
    return tq.get("spec", {}).get("scaling", {}).get("minReplicas", 0)


def wanted(tq):
    return tq.get("status", {}).get("desiredReplicas") or 0


def ready(tq):
    return tq.get("status", {}).get("readyReplicas") or 0


def pend(tq):
    return tq.get("status", {}).get("pending") or 0


if __name__ == "__main__":
    sys.exit(main())
