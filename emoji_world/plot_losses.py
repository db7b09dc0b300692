"""Plot training loss curves from ``losses.csv`` logs (written by train_vae / train_unet).

    python -m emoji_world.plot_losses runs/emoji-64/vae/losses.csv runs/emoji-64/unet/losses.csv \
        --labels VAE UNet --output keylocked/models/emoji-64/evaluation/losses.png

One panel per log: loss against training minutes (log scale), with the learning rate on a
second axis, so the model card shows how each stage's budget was spent.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import read_loss_log


def plot_losses(logs: list[Path], output: Path, labels: list[str] | None = None, title: str = "") -> Path:
    """Write a PNG with one panel per loss log; returns ``output``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not logs:
        raise ValueError("plot_losses needs at least one losses.csv")
    labels = labels or [Path(log).parent.name for log in logs]
    if len(labels) != len(logs):
        raise ValueError(f"{len(labels)} labels for {len(logs)} logs")
    fig, axes = plt.subplots(1, len(logs), figsize=(4.6 * len(logs), 3.4), squeeze=False)
    for ax, log, label in zip(axes[0], logs, labels):
        columns = read_loss_log(log)
        ax.plot(columns["minutes"], columns["loss"], color="tab:blue", lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("training minutes")
        ax.set_ylabel("loss (mean per logged interval)", color="tab:blue")
        steps = int(columns["step"][-1]) if len(columns["step"]) else 0
        ax.set_title(f"{label}: {steps:,} steps", fontsize=10)
        ax.grid(alpha=0.3, which="both")
        lr_axis = ax.twinx()
        lr_axis.plot(columns["minutes"], columns["lr"], color="tab:orange", lw=0.8, alpha=0.7)
        lr_axis.set_ylabel("learning rate", color="tab:orange")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)
    plt.close(fig)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", type=Path, nargs="+", help="losses.csv files")
    parser.add_argument("--labels", nargs="*", default=None)
    parser.add_argument("--title", default="")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    print(plot_losses(args.logs, args.output, args.labels, args.title))


if __name__ == "__main__":
    main()
