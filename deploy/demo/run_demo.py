"""Demo driver: enqueue real Celery tasks, stand in for the kubelet, print pending vs replicas.

Exits 0 once every pool scaled up for the burst and came back to its minReplicas with an empty
queue; exits 1 if that does not happen within --timeout seconds.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import produce

POOLS = ["urgent", "ai-processing", "demo-tasks", "general"]


def kubectl(*args):
    return json.loads(subprocess.run(["kubectl", *args, "-o", "json"], check=True, capture_output=True, text=True).stdout)


class KubeletStandIn:
    """Keeps spec.replicas local worker processes per Deployment, with its container command."""

    def __init__(self, namespace, logs):
        self.namespace, self.logs, self.procs = namespace, logs, {}

    def sync(self, deployments):
        for d in deployments:
            name = d["metadata"]["name"]
            want = d["spec"].get("replicas", 1)
            cmd = d["spec"]["template"]["spec"]["containers"][0]["command"]
            procs = self.procs.setdefault(name, [])
            procs[:] = [p for p in procs if p.poll() is None]
            while len(procs) < want:
                # %h in -n is the pod's host name; give each stand-in a distinct one.
                args = [a.replace("%h", f"{name}-{len(procs)}") for a in cmd[1:]]
                log = open(os.path.join(self.logs, f"demo-{name}-{len(procs)}.log"), "w")
                procs.append(subprocess.Popen([sys.executable, "-m", "celery", *args, "--loglevel=WARNING"], stdout=log, stderr=log))
            while len(procs) > want:
                procs.pop().send_signal(signal.SIGTERM)  # warm shutdown, as the kubelet would

    def running(self, name):
        return sum(1 for p in self.procs.get(name, []) if p.poll() is None)

    def stop(self):
        for procs in self.procs.values():
            for p in procs:
                p.send_signal(signal.SIGTERM)
        for procs in self.procs.values():
            for p in procs:
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--namespace", required=True)
    ap.add_argument("--logs", required=True)
    ap.add_argument("--users", type=int, default=60)
    ap.add_argument("--timeout", type=int, default=300)
    a = ap.parse_args()
    os.environ.setdefault("TASK_SCALE", "0.3")  # AI tasks ~2.4 s, demo tasks ~0.3 s
    kubelet = KubeletStandIn(a.namespace, a.logs)
    t0 = time.time()
    burst_sent = shown = False
    peak = {p: 0 for p in POOLS}
    print(f"{'t':>5}  " + "  ".join(f"{p:>22}" for p in POOLS))
    print(f"{'':>5}  " + "  ".join(f"{'pending/desired/workers':>22}" for _ in POOLS))
    try:
        while time.time() - t0 < a.timeout:
            tqs = {t["metadata"]["name"]: t for t in kubectl("-n", a.namespace, "get", "taskqueues")["items"]}
            deps = kubectl("-n", a.namespace, "get", "deployments")["items"]
            kubelet.sync(deps)
            row, settled = [], True
            for p in POOLS:
                st = tqs.get(p, {}).get("status", {})
                spec = tqs.get(p, {}).get("spec", {}).get("scaling", {})
                pending, desired = st.get("pending"), st.get("desiredReplicas")
                peak[p] = max(peak[p], desired or 0)
                row.append(f"{str(pending):>10}/{str(desired):>4}/{kubelet.running(p):>6}")
                settled &= pending == 0 and desired == spec.get("minReplicas", 0)
            print(f"{time.time() - t0:5.0f}  " + "  ".join(f"{r:>22}" for r in row), flush=True)
            if burst_sent and not shown and all((tqs[p].get("status", {}).get("pending") or 0) > 0 for p in POOLS):
                subprocess.run(["kubectl", "-n", a.namespace, "get", "taskqueues"], check=False)
                shown = True
            if not burst_sent and all(p in tqs and "desiredReplicas" in tqs[p].get("status", {}) for p in POOLS):
                print(f"       -> {a.users} x register_user (the seed's example) + 9 reports + 3 urgent pages", flush=True)
                for i in range(a.users):
                    produce.register_user(i)
                for i in range(9):
                    produce.reports.build_monthly_report.delay(f"2026-{i + 1:02d}")
                for i in range(3):
                    produce.urgent.page_oncall.delay(f"page {i}")
                burst_sent = True
            elif burst_sent and settled and all(peak[p] > spec_min(tqs[p]) for p in ["ai-processing", "demo-tasks"]):
                print(f"done: queues drained and pools back to minReplicas after {time.time() - t0:.0f}s; peaks {peak}")
                return 0
            time.sleep(1)
        print(f"timeout after {a.timeout}s; peaks {peak}", file=sys.stderr)
        return 1
    finally:
        kubelet.stop()


def spec_min(tq):
    return tq.get("spec", {}).get("scaling", {}).get("minReplicas", 0)


if __name__ == "__main__":
    sys.exit(main())
