"""Metrics sinks for EPLB: the log, wandb (offline works, respects ``WANDB_MODE``) and TensorBoard.

The manager calls :meth:`Monitor.rebalance` when a rebalance completes and :func:`log_realized` every
``eplb_log_interval`` steps; training loops call :meth:`Monitor.log` with their own scalars.  One rank writes (create the monitor on rank 0 only, or pass
``rank``).  Imports neither Megatron nor DeepSpeed; wandb, TensorBoard and matplotlib are imported lazily
and each sink is skipped with a warning when its package is missing.

What is written per rebalance: balancedness per layer (``eplb/balancedness/layer_<l>`` line series, plus
before/after aggregates), the ``[L, E]`` load heat map (an image, also saved as
``out_dir/expert_load.png``), a table ``(step, layer, expert, tokens)``, moved slots / bytes and seconds
per phase (gather, plan_wait, transfer).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from .placement import ExpertPlacement
from .stats import balance_summary

__all__ = ["Monitor", "log_realized", "plot_expert_load"]

log = logging.getLogger("megatron_eplb")


def plot_expert_load(load: np.ndarray, path: str | os.PathLike | None = None, *, title: str = "expert load"):
    """Heat map of an ``[L, E]`` load matrix (matplotlib Agg); saved to ``path`` when given. Returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(load, dtype=np.float64)
    fig, ax = plt.subplots(
        figsize=(max(4.0, load.shape[1] * 0.35 + 1.5), max(2.0, load.shape[0] * 0.4 + 1.2))
    )
    im = ax.imshow(load, aspect="auto", cmap="viridis")
    ax.set_xlabel("logical expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="tokens")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
    return fig


def log_realized(entry: dict[str, Any], monitor: Monitor | None = None) -> None:
    """The log line of the realized balancedness of some steps beside Megatron's default placement
    (``entry``: :func:`megatron_eplb.stats.realized_steps`), and its ``eplb/`` metrics to ``monitor`` at
    its last step.  Call it on the writing rank."""
    log.info(
        "EPLB steps %d-%d: realized balancedness per step %.3f (worst %.3f), Megatron's default placement "
        "on the same steps %.3f",
        entry["first_step"],
        entry["last_step"],
        entry["eplb/balancedness_realized"],
        entry["eplb/balancedness_realized_min"],
        entry["eplb/balancedness_default_placement"],
    )
    if monitor is not None:
        monitor.log(entry["last_step"], {k: v for k, v in entry.items() if k.startswith("eplb/")})


class Monitor:
    """Writes EPLB metrics to the log, wandb and TensorBoard.

    Args:
        out_dir: folder for the wandb run (``out_dir/wandb``), TensorBoard events (``out_dir/tensorboard``)
            and the heat map PNG.
        run_name: wandb run name.
        use_wandb, use_tensorboard: enable the sinks (wandb defaults to offline when ``WANDB_MODE`` is unset
            and no API key is configured).
        rank: the writing rank; other ranks make a no-op monitor.  Default: ``RANK`` env var or 0.
        config: a dict logged as the wandb run config.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike = "outputs/eplb",
        run_name: str | None = None,
        *,
        use_wandb: bool = True,
        use_tensorboard: bool = True,
        rank: int | None = None,
        config: dict | None = None,
        project: str = "megatron-eplb",
    ) -> None:
        self.rank = int(os.environ.get("RANK", 0)) if rank is None else rank
        self.enabled = self.rank == 0
        self.out_dir = Path(out_dir)
        self.heatmap_path = self.out_dir / "expert_load.png"
        self._wandb = None
        self._run = None
        self._tb = None
        self._table_rows: list[list[int]] = []
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if use_wandb:
            self._start_wandb(run_name, config, project)
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except Exception as exc:  # noqa: BLE001 - a missing sink must not stop training
                log.warning("monitor: TensorBoard disabled (%s)", exc)

    def _start_wandb(self, run_name: str | None, config: dict | None, project: str) -> None:
        try:
            import wandb
        except ImportError:
            log.warning("monitor: wandb is not installed; wandb logging disabled")
            return
        if "WANDB_MODE" not in os.environ and not os.environ.get("WANDB_API_KEY"):
            os.environ["WANDB_MODE"] = "offline"
        try:
            self._run = wandb.init(
                project=project,
                name=run_name,
                dir=str(self.out_dir),
                config=config or {},
                reinit="finish_previous",
                settings=wandb.Settings(silent=True, console="off"),
            )
            self._wandb = wandb
            log.info(
                "monitor: wandb run %s (%s) in %s", self._run.id, os.environ.get("WANDB_MODE"), self._run.dir
            )
        except Exception as exc:  # noqa: BLE001
            log.warning("monitor: wandb disabled (%s)", exc)

    @property
    def wandb_dir(self) -> str | None:
        """The wandb run folder (``.../wandb/offline-run-...``), or None."""
        return None if self._run is None else str(Path(self._run.dir).parent)

    # ------------------------------------------------------------------ calls
    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Scalars (loss, balancedness, ...) to every sink and the log."""
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in scalars.items() if v is not None and np.isfinite(float(v))}
        if self._run is not None:
            self._run.log({f"train/{k}": v for k, v in clean.items()}, step=step)
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(f"train/{k}", v, step)
        log.debug("step %d: %s", step, clean)

    def rebalance(self, step: int, record: Any, placement: ExpertPlacement, load: np.ndarray | None) -> None:
        """Called by the manager when a rebalance completes (``record``: a ``RebalanceRecord``)."""
        if not self.enabled:
            return
        info = record.as_dict() if hasattr(record, "as_dict") else dict(record)
        scalars: dict[str, float] = {
            "eplb/balancedness_before": info.get("balancedness_before", float("nan")),
            "eplb/balancedness_after": info.get("balancedness_after", float("nan")),
            "eplb/measured_balancedness_before": info.get("measured_balancedness_before", float("nan")),
            "eplb/moved_slots": info.get("moved_slots", 0),
            "eplb/moved_bytes": info.get("moved_bytes", 0),
            "eplb/layers_committed": len(info.get("layers_committed", [])),
        }
        for phase, seconds in (info.get("seconds") or {}).items():
            scalars[f"eplb/seconds_{phase}"] = seconds
        per_layer: list[float] = []
        if load is not None:
            load = np.asarray(load, dtype=np.float64)
            per_layer = balance_summary(placement, load)["per_layer"]
            for layer, value in enumerate(per_layer):
                scalars[f"eplb/balancedness/layer_{layer}"] = value
            for layer in range(load.shape[0]):
                for expert in range(load.shape[1]):
                    self._table_rows.append([int(step), layer, expert, int(load[layer, expert])])
        clean = {k: float(v) for k, v in scalars.items() if v is not None and np.isfinite(float(v))}
        log.info(
            "EPLB rebalance at step %d: %s, balancedness %.3f -> %.3f, %d slots moved (%d bytes), %s",
            step,
            info.get("outcome"),
            info.get("balancedness_before", float("nan")),
            info.get("balancedness_after", float("nan")),
            int(info.get("moved_slots", 0)),
            int(info.get("moved_bytes", 0)),
            ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in (info.get("seconds") or {}).items()),
        )
        fig = None
        if load is not None:
            try:
                fig = plot_expert_load(
                    load, self.heatmap_path, title=f"expert load (window before step {step})"
                )
            except Exception as exc:  # noqa: BLE001
                log.warning("monitor: heat map not drawn (%s)", exc)
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            if fig is not None:
                self._tb.add_figure("eplb/expert_load", fig, step, close=False)
        if self._run is not None:
            payload: dict[str, Any] = dict(clean)
            if fig is not None:
                payload["eplb/expert_load"] = self._wandb.Image(fig)
            if self._table_rows:
                payload["eplb/expert_load_table"] = self._wandb.Table(
                    columns=["step", "layer", "expert", "tokens"], data=list(self._table_rows)
                )
            self._run.log(payload, step=step)
        if fig is not None:
            import matplotlib.pyplot as plt

            plt.close(fig)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._run is not None:
            self._run.finish()
            self._run = None
