"""What a report reads: jobs, runs, metric series and artifacts from the store and the disk.

Only numpy and the standard library (and the store's public API): reports are fast and never load
torch. Everything is plain data the figure and table writers consume.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.triggerspec import pattern_array
from store.entities import ArtifactInfo, JobDetail, RunInfo, StudyMember

BETA_KEY = re.compile(r"^(?P<stage>[^/]+)/beta=(?P<beta>[^/]+)/(?P<name>.+)$")
BETA_LABEL = re.compile(r"beta=(?P<beta>[^/]+)")
# Peak memory as the runs record it: the runner's per-run figures and the train task's own.
PEAK_RSS_KEYS = ("resource/peak_rss_mb",)
PEAK_GPU_KEYS = ("resource/peak_cuda_mb",)
TASK_PEAK_KEY = "memory/peak_mb"


# ---------------------------------------------------------------------------------------------
# Trigger patterns from their spec (the same pixels engine.ml.triggers makes, without torch)


def trigger_pattern(spec: str | None, channels: int = 3) -> np.ndarray | None:
    """The (C, k, k) pattern in [0, 1] of a trigger spec (the pixels training stamps, from
    ``engine.triggerspec.pattern_array``), or None when it cannot be drawn (a file gone)."""
    if not spec:
        return None
    try:
        return pattern_array(spec, channels)
    except (UserError, OSError, ValueError):
        return None


def as_chw(array: np.ndarray) -> np.ndarray:
    """Samples as (N, C, k, k): accepts (N, C, k, k), (N, k, k, C) and (N, C*3*3)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2 and a.shape[1] % 9 == 0:
        return a.reshape(a.shape[0], a.shape[1] // 9, 3, 3)
    if a.ndim == 4 and a.shape[-1] in (1, 3) and a.shape[1] not in (1, 3):
        return a.transpose(0, 3, 1, 2)
    if a.ndim == 4:
        return a
    raise ValueError(f"samples of shape {a.shape} are not (N, C, k, k)")


def to_rgb(pattern: np.ndarray) -> np.ndarray:
    """(C, k, k) -> (k, k, 3) for imshow."""
    p = np.clip(np.asarray(pattern, dtype=np.float32), 0.0, 1.0)
    img = p.transpose(1, 2, 0)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img[..., :3]


# ---------------------------------------------------------------------------------------------
# Jobs


@dataclass
class RunData:
    """A run as the cost and provenance tables read it: the store's ``RunInfo`` and the latest
    value of each of its metrics (peak memory). Not a store value: the latest values are read
    beside the run."""

    info: RunInfo
    latest: dict[str, float]

    @property
    def wall_s(self) -> float | None:
        if self.info.started_at is None or self.info.ended_at is None:
            return None
        return max(0.0, (self.info.ended_at - self.info.started_at).total_seconds())

    @property
    def device(self) -> str:
        name = (self.info.env or {}).get("device_name")
        if name:
            return str(name)
        return f"gpu {self.info.gpu}" if self.info.gpu else "unknown"

    def peak(self, keys: Sequence[str]) -> float | None:
        values = [self.latest[k] for k in keys if _finite(self.latest.get(k))]
        return max(values) if values else None

    @property
    def peak_rss_mb(self) -> float | None:
        """Peak resident memory of the run's process (the train task's own figure on a CPU)."""
        rss = self.peak(PEAK_RSS_KEYS)
        if rss is None and self.device == "cpu":
            rss = self.peak((TASK_PEAK_KEY,))
        return rss

    @property
    def peak_gpu_mb(self) -> float | None:
        """Peak allocated GPU memory (the train task's own figure on a GPU)."""
        gpu = self.peak(PEAK_GPU_KEYS)
        if gpu is None and self.device not in ("cpu", "unknown"):
            gpu = self.peak((TASK_PEAK_KEY,))
        return gpu


@dataclass
class JobData:
    """One job with everything a report shows about it: the store's ``JobDetail``, the job as its
    study places it (``role``, ``trigger``, ``method``, ``seed``: the membership's, else the
    job's own), each run with its latest values, and the keys of its metrics. Not a store value:
    the membership and the metrics are read beside the detail; the job's own fields are read
    from ``detail``."""

    detail: JobDetail
    role: str
    trigger: str | None
    method: str | None
    seed: int | None
    runs: list[RunData]
    metric_keys: list[str] = field(default_factory=list)

    @property
    def id(self) -> int:
        return self.detail.job.id

    @property
    def kind(self) -> str:
        return self.detail.job.kind

    @property
    def label(self) -> str:
        return self.detail.job.label or ""

    @property
    def status(self) -> str:
        return self.detail.job.status

    @property
    def spec(self) -> dict[str, Any]:
        return self.detail.job.spec or {}

    @property
    def error(self) -> str | None:
        return self.detail.job.error

    @property
    def result(self) -> dict[str, Any] | None:
        return self.detail.result

    @property
    def workdir(self) -> str | None:
        return self.detail.workdir

    @property
    def dataset_hash(self) -> str | None:
        return self.detail.dataset_hash

    @property
    def artifacts(self) -> tuple[ArtifactInfo, ...]:
        return self.detail.artifacts

    @property
    def depends_on(self) -> list[int]:
        return [d.job_id for d in self.detail.depends_on]

    @property
    def metrics(self) -> dict[str, float]:
        return dict((self.result or {}).get("metrics") or {})

    @property
    def name(self) -> str:
        return f"job {self.id} ({self.kind}{', ' + self.label if self.label else ''})"

    def artifact_dir(self) -> Path | None:
        """The job's artifact directory: the one its result names, else the newest announced,
        else its work directory."""
        chosen = (self.result or {}).get("artifact")
        candidates = [chosen] if chosen else []
        candidates += [a.path for a in reversed(self.artifacts)]
        if self.workdir:
            candidates.append(self.workdir)
        for c in candidates:
            if c and Path(c).is_dir():
                return Path(c)
        return None


def load_job(store: Any, job_id: int, member: StudyMember | None = None) -> JobData:
    detail = store.job_detail(job_id)
    job = detail.job
    run_ids = [r.id for r in detail.runs]
    latest = store.latest_metrics(run_ids) if run_ids else {}
    spec = job.spec or {}
    # The study's trigger, else the job's own (its spec's, or its attack's for a search or repair).
    trigger = member.trigger if member is not None and member.trigger else job.trigger
    return JobData(
        detail=detail,
        role=(member.role if member is not None else job.kind) or job.kind,
        trigger=trigger if isinstance(trigger, str) and trigger != "none" else None,
        method=(member.method if member is not None else None) or spec.get("method"),
        seed=member.seed if member is not None and member.seed is not None else spec.get("seed"),
        runs=[RunData(r, dict(latest.get(r.id, {}))) for r in detail.runs],
        metric_keys=store.metric_keys(job_id),
    )


def upstream_chain(store: Any, job_id: int, limit: int = 20) -> list[int]:
    """The job's upstream jobs (dependencies, their dependencies, ...), oldest first."""
    seen: list[int] = []
    todo = [job_id]
    while todo and len(seen) < limit:
        current = todo.pop()
        for dep in store.job_detail(current).depends_on:
            if dep.job_id not in seen and dep.job_id != job_id:
                seen.append(dep.job_id)
                todo.append(dep.job_id)
    return sorted(seen)


# ---------------------------------------------------------------------------------------------
# Series


@dataclass
class Series:
    """One metric of a job as the figures draw it: numpy arrays (steps may become epochs), built
    from the store's ``SeriesPoint`` list; the store has no array-valued class to share."""

    key: str
    steps: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.steps)


def series(store: Any, job: JobData, key: str) -> Series | None:
    """One metric of a job across its attempts (``Store.metric_series``); None when absent."""
    if key not in job.metric_keys:
        return None
    points = store.metric_series(job.id, key)
    if not points:
        return None
    return Series(
        key,
        np.asarray([p.step for p in points], dtype=np.float64),
        np.asarray([p.value for p in points], dtype=np.float64),
    )


def epoch_axis(store: Any, job: JobData, s: Series, epoch_key: str) -> Series:
    """Re-index a series logged at global steps by epoch, where the job logs ``epoch_key`` at
    the same steps (train: ``train/epoch``); unchanged otherwise."""
    epochs = series(store, job, epoch_key)
    if epochs is None:
        return s
    by_step = dict(zip(epochs.steps.tolist(), epochs.values.tolist(), strict=True))
    if not all(step in by_step for step in s.steps.tolist()):
        return s
    return Series(s.key, np.asarray([by_step[x] for x in s.steps.tolist()]), s.values)


# ---------------------------------------------------------------------------------------------
# Searches


@dataclass
class SearchData:
    """A MESA search: its samples per beta, the original pattern when known, histograms. Read
    from the search's folder on disk, which the store does not hold: no store class to share."""

    job: JobData
    directory: Path | None
    samples: dict[str, np.ndarray]  # beta label -> (N, C, k, k)
    original: np.ndarray | None
    histograms: dict[str, list[int]]  # beta label -> counts over [0, 1] (own ASR per sample)
    betas: list[str]

    @property
    def target(self) -> Any:
        return (self.job.result or {}).get("target", self.job.spec.get("target"))


def _beta_order(labels: Iterable[str]) -> list[str]:
    def key(b: str) -> tuple[int, float | str]:
        try:
            return (0, -float(b))
        except ValueError:
            return (1, b)

    return sorted(set(labels), key=key)


def load_search(job: JobData) -> SearchData:
    directory = job.artifact_dir()
    samples: dict[str, np.ndarray] = {}
    if directory is not None:
        for f in sorted(directory.glob("beta=*/samples.npy")):
            try:
                samples[f.parent.name.removeprefix("beta=")] = as_chw(
                    np.load(f, allow_pickle=False)
                )
            except (OSError, ValueError):
                continue
    histograms: dict[str, list[int]] = {}
    raw = (job.result or {}).get("histograms")
    if not raw and directory is not None and (directory / "stats.json").exists():
        try:
            raw = json.loads((directory / "stats.json").read_text()).get("histograms")
        except (OSError, ValueError):
            raw = None
    for key, counts in (raw or {}).items():
        m = BETA_LABEL.search(str(key))
        if m and isinstance(counts, list):
            histograms[m["beta"]] = [int(c) for c in counts]
    betas = set(samples) | set(histograms)
    for key in job.metric_keys:
        m = BETA_KEY.match(key)
        if m and m["stage"] == "mesa":
            betas.add(m["beta"])
    ordered = _beta_order(betas)
    return SearchData(
        job=job,
        directory=directory,
        samples={b: samples[b] for b in ordered if b in samples},
        original=ground_truth_pattern(directory) if directory is not None else None,
        histograms={b: histograms[b] for b in ordered if b in histograms},
        betas=ordered,
    )


def ground_truth_pattern(directory: Path) -> np.ndarray | None:
    """The original trigger from ``ground_truth.json`` here or in an upstream artifact (the
    evaluation's knowledge: reports may show it, no defender code path reads it)."""
    candidates = [directory]
    manifest = directory / "manifest.json"
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
            candidates += [Path(u["path"]) for u in data.get("upstream", []) if "path" in u]
            model = (data.get("meta") or {}).get("model")
            if model:
                candidates.append(Path(model))
        except (OSError, ValueError, TypeError):
            pass
    for d in candidates:
        gt = d / "ground_truth.json"
        if gt.exists():
            try:
                pattern = json.loads(gt.read_text()).get("pattern")
            except (OSError, ValueError):
                continue
            if pattern is not None:
                return np.asarray(pattern, dtype=np.float32)
    return None


def pca_2d(samples: dict[str, np.ndarray], extra: np.ndarray | None = None):
    """Every beta's samples on the first two principal axes of all samples together (numpy
    SVD); ``extra`` (the original pattern) is projected on the same axes."""
    flat = {b: s.reshape(len(s), -1).astype(np.float64) for b, s in samples.items() if len(s)}
    if not flat:
        return {}, None
    stacked = np.concatenate(list(flat.values()))
    mean = stacked.mean(axis=0)
    _, _, vt = np.linalg.svd(stacked - mean, full_matrices=False)
    axes = vt[:2].T if vt.shape[0] >= 2 else np.pad(vt.T, ((0, 0), (0, 2 - vt.shape[0])))
    projected = {b: (f - mean) @ axes for b, f in flat.items()}
    point = None
    if extra is not None and extra.size == stacked.shape[1]:
        point = (extra.reshape(1, -1).astype(np.float64) - mean) @ axes
    return projected, point


def tsne_2d(samples: dict[str, np.ndarray], seed: int = 0) -> dict[str, np.ndarray] | None:
    """t-SNE of all samples together when scikit-learn is installed; None otherwise."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        return None
    flat = {b: s.reshape(len(s), -1) for b, s in samples.items() if len(s)}
    stacked = np.concatenate(list(flat.values())) if flat else np.zeros((0, 1))
    if len(stacked) < 5:
        return None
    perplexity = float(min(30, max(2, (len(stacked) - 1) // 3)))
    xy = TSNE(2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(stacked)
    out, start = {}, 0
    for b, f in flat.items():
        out[b] = xy[start : start + len(f)]
        start += len(f)
    return out


# ---------------------------------------------------------------------------------------------
# GPU benchmark results (benchmarks/gpu_bench.py's JSON)


@dataclass
class GpuResult:
    """A GPU benchmark's JSON file (benchmarks/gpu_bench.py); the store never holds it."""

    path: str
    device: str
    torch: str | None
    cuda: str | None
    tiny: bool
    figures: dict[str, Any]
    # The paper protocol's ResNet-18 pilot (format 2): its per-trigger records (schema 1, as
    # benchmarks/paper_study.py writes them) and what the budget left unfinished or unstarted.
    records: list[dict[str, Any]] = field(default_factory=list)
    paper: dict[str, Any] = field(default_factory=dict)


# Kept out of the figures table: the run's bookkeeping and the pilot's records (its own section).
GPU_BOOKKEEPING = ("environment", "benchmark", "tiny", "format", "command", "history", "started",
                   "updated", "dataset")  # fmt: skip


def flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    """Nested dicts (and lists of dicts, by position) to dotted keys; other values as they are."""
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for i, v in enumerate(value):
            flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = value


def load_gpu_result(path: str | Path) -> GpuResult:
    from engine.errors import UserError

    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(
            f"--gpu-results '{path}' does not exist; give a JSON file written by "
            "benchmarks/gpu_bench.py (benchmarks/results/*.json)"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(
            f"--gpu-results '{path}' is not readable JSON ({exc}); give a file written by "
            "benchmarks/gpu_bench.py"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("environment"), dict):
        raise UserError(
            f"--gpu-results '{path}' has no 'environment' object; give a file written by "
            "benchmarks/gpu_bench.py"
        )
    env = data["environment"]
    paper = data.get("paper_resnet18") or {}
    records = paper.get("records") or []
    figures: dict[str, Any] = {}
    flatten(
        "",
        {k: v for k, v in data.items() if k not in (*GPU_BOOKKEEPING, "paper_resnet18")},
        figures,
    )
    if paper:
        figures["paper_resnet18.triggers_finished"] = len(records)
        figures["paper_resnet18.stopped"] = paper.get("stopped")
    return GpuResult(
        path=str(p),
        device=str(env.get("device_name") or env.get("device") or "unknown device"),
        torch=env.get("torch"),
        cuda=env.get("cuda") or None,
        tiny=bool(data.get("tiny")),
        figures=figures,
        records=records,
        paper={k: v for k, v in paper.items() if k not in ("records", "protocol")},
    )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)
