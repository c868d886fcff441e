"""A Celery router that follows the routing table the operator publishes, without a restart.

Copy this file into your app and use it in place of a fixed `task_routes`:

    import os
    from taskqueue_routes import FileRoutes
    app.conf.task_routes = (FileRoutes(os.environ["TASK_ROUTES_FILE"]),)

TASK_ROUTES_FILE is where the ConfigMap `celery-task-routes` (key `task_routes.json`) is mounted,
e.g. /etc/celery-routes/task_routes.json (see celery-app-routes.yaml next to this file). Parts of
a table above 1 MiB (task_routes.json.part002, ...) are read too, in name order.

- When producers see a change: the kubelet swaps a ConfigMap volume's files atomically, within
  its sync period plus its ConfigMap cache TTL (about a minute each by default); this router then
  notices on the first task it routes after `check_every` seconds (5 by default): no restart.
- No table yet (no TaskQueue in the namespace: mount the volume with `optional: true`) or a file
  that does not parse: no route matches, so Celery sends tasks to `task_default_queue`, and a
  table that stops parsing keeps the last good one. Either is logged once per change.
- Semantics are Celery's own: the table is handed to `celery.app.routes.MapRoute`, the class
  Celery builds from a `task_routes` list (a glob only with `*`, first match wins).
"""
import glob
import json
import logging
import os
import threading
import time

from celery.app.routes import MapRoute

log = logging.getLogger(__name__)


class FileRoutes:
    """A `task_routes` entry: routes a task by the table in `path` (and its parts)."""

    def __init__(self, path, check_every=5.0):
        self.path = path
        self.check_every = check_every
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._seen = None  # (name, inode, mtime_ns, size) of each file last read
        self._route = MapRoute([])

    def __call__(self, name, args=None, kwargs=None, options=None, task=None, **kw):
        self._refresh()
        return self._route(name)

    def _files(self):
        return sorted(glob.glob(self.path + "*"))

    def _stamp(self, files):
        stamp = []
        for f in files:
            try:
                st = os.stat(f)  # follows the kubelet's ..data symlink: a new version, a new inode
            except FileNotFoundError:
                continue
            stamp.append((f, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _refresh(self):
        now = time.monotonic()
        if now - self._checked < self.check_every:
            return
        with self._lock:
            if now - self._checked < self.check_every:
                return
            self._checked = now
            files = self._files()
            stamp = self._stamp(files)
            if stamp == self._seen:
                return
            self._seen = stamp
            if not stamp:
                log.warning("no routing table at %s: tasks go to task_default_queue", self.path)
                self._route = MapRoute([])
                return
            try:
                pairs = [pair for f, *_ in stamp for pair in _read(f)]
            except (OSError, ValueError) as e:
                log.error("routing table %s not read (%s): keeping the previous one", self.path, e)
                return
            self._route = MapRoute(pairs)
            log.info("routing table %s loaded: %d routes", self.path, len(pairs))


def _read(path):
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    if not isinstance(table, list) or not all(isinstance(p, list) and len(p) == 2 for p in table):
        raise ValueError("not a list of [pattern, queue] pairs")
    return [(pattern, {"queue": queue} if isinstance(queue, str) else queue) for pattern, queue in table]
