"""Where distributed work runs: the Dask cluster a ``--scheduler`` value names.

Both ``cemcurate build`` and ``finetune predict`` take the same values:

* ``tcp://HOST:PORT`` (any address ``distributed.Client`` accepts: ``tls://``, ``ws://``):
  join a running scheduler, e.g. one started with ``dask scheduler`` and ``dask worker``;
* ``local:N``: start a ``LocalCluster`` of ``N`` single-threaded worker processes here;
* ``FILE.yaml``: a `dask-jobqueue <https://jobqueue.dask.org>`_ cluster on a batch system:
  ``jobqueue`` names the system (``slurm``, ``pbs``, ``lsf``, ``sge``, ``oar``,
  ``htcondor``, ``moab``), ``jobs`` how many batch jobs to start, and every other key is
  passed to that cluster class (``cores``, ``memory``, ``processes``, ``walltime``,
  ``queue``, ``account``, ``job_extra_directives``, ...). See the README for a SLURM example.

Dask, not a scheduler of our own: it re-runs the tasks of a worker that dies, spreads them
over whatever workers join, and its dashboard shows the run.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import yaml

from cemcurate.common.lazy import lazy_import

distributed = lazy_import("distributed")
dask_jobqueue = lazy_import("dask_jobqueue")

JOBQUEUE_CLUSTERS = {
    "slurm": "SLURMCluster",
    "pbs": "PBSCluster",
    "lsf": "LSFCluster",
    "sge": "SGECluster",
    "oar": "OARCluster",
    "htcondor": "HTCondorCluster",
    "moab": "MoabCluster",
}
SCHEDULER_HELP = (
    "run on Dask: tcp://HOST:PORT joins a running scheduler, local:N starts N worker processes here, "
    "FILE.yaml starts a dask-jobqueue cluster (SLURM, PBS, LSF, ...; see the README)"
)


@dataclass(frozen=True)
class SchedulerSpec:
    """A parsed ``--scheduler`` value: ``kind`` is ``address``, ``local`` or ``jobqueue``."""

    kind: str
    address: str = ""
    workers: int = 0
    jobqueue: str = ""
    jobs: int = 0
    options: tuple[tuple[str, object], ...] = ()


def parse_scheduler(text: str) -> SchedulerSpec:
    """Parse a ``--scheduler`` value (see the module docstring); reads ``FILE.yaml``.

    Raises:
        ValueError: an empty or malformed value, a bad ``local:N``, a YAML file that is
            missing, unreadable or names an unknown batch system.
    """
    text = str(text).strip()
    if not text:
        raise ValueError(f"--scheduler is empty; {SCHEDULER_HELP}")
    if text.startswith("local:") or text == "local":
        count = text.partition(":")[2]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--scheduler {text}: expected local:N with N >= 1 worker processes")
        return SchedulerSpec("local", workers=int(count))
    if "://" in text:
        return SchedulerSpec("address", address=text)
    path = Path(text)
    if path.suffix.lower() not in (".yaml", ".yml"):
        raise ValueError(f"--scheduler {text}: not an address (tcp://HOST:PORT), local:N or a .yaml file")
    if not path.is_file():
        raise ValueError(f"--scheduler {path}: file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"--scheduler {path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"--scheduler {path}: expected a mapping of dask-jobqueue settings")
    system = str(data.pop("jobqueue", "")).lower()
    if system not in JOBQUEUE_CLUSTERS:
        raise ValueError(
            f"--scheduler {path}: 'jobqueue' must be one of {', '.join(JOBQUEUE_CLUSTERS)}, got {system!r}"
        )
    jobs = data.pop("jobs", 1)
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--scheduler {path}: 'jobs' must be a number of batch jobs >= 1, got {jobs!r}")
    return SchedulerSpec("jobqueue", jobqueue=system, jobs=jobs, options=tuple(sorted(data.items())))


@contextlib.contextmanager
def dask_client(text: str, quiet: bool = False) -> Iterator[object]:
    """A ``distributed.Client`` on the cluster ``text`` names, closed (and a cluster we
    started, shut down) on exit. Prints the dashboard address unless ``quiet``."""
    spec = parse_scheduler(text)
    cluster = None
    try:
        if spec.kind == "local":
            cluster = distributed.LocalCluster(
                n_workers=spec.workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
            client = distributed.Client(cluster)
        elif spec.kind == "jobqueue":
            cluster_class = getattr(dask_jobqueue, JOBQUEUE_CLUSTERS[spec.jobqueue])
            cluster = cluster_class(**dict(spec.options))
            cluster.scale(jobs=spec.jobs)
            client = distributed.Client(cluster)
        else:
            client = distributed.Client(spec.address, timeout="30s")
    except OSError as exc:
        if cluster is not None:
            cluster.close()
        raise ValueError(f"--scheduler {text}: cannot reach the scheduler ({exc})") from exc
    try:
        if not quiet:
            print(f"dask: scheduler {client.scheduler.address}, dashboard {client.dashboard_link}", file=sys.stderr)
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
