"""Coil's Weights & Biases sidecar: follows <run_dir>/metrics.jsonl and sends its numbers to W&B
through the official `wandb` client, in a process of its own, so that training never waits on W&B
nor fails because of it (launch/wandb.h starts it; it is compiled into coil and run with
`python -c`, and runs as well from this file).

- The run: wandb.init(id=<run_dir/wandb_run_id>, resume="allow", project, entity, name, mode,
  config=<run_dir/config.toml>, dir=<run_dir>): the resolved configuration is the run's
  hyperparameters, and a resumed Coil run continues the same W&B run.
- The scalars, the same as TensorBoard's (launch/metrics.h): a training line's numbers as
  train/<key> (not step, tokens, elapsed_s; non-finite numbers, written as null, left out), an
  evaluation's as val/loss and val/ppl (and val/loss/<name> for each of several held-out sets),
  each logged at the line's step.
- Following the file: new complete lines are read every half second; a file that shrinks or is
  replaced (a resumed run trims it) is read again from its start. Steps up to the last one sent
  (run_dir/wandb_last_step, kept by this script) are not sent again, so a resumed run sends only
  what W&B lacks (a step redone after a crash keeps the values sent first).
- CPU: the sidecar and wandb's service process run at nice 10, below training.
- The end: when stdin reaches its end (coil closes the pipe, or coil is gone, however it ended)
  or the parent process changes, the lines written so far are sent, the run is finished, and the
  script exits 0. Any failure (wandb missing, init refused) is a traceback and a non-zero exit;
  coil then prints one warning.
"""
import argparse
import json
import math
import os
import select
import sys
import time
import tomllib

SKIPPED = {"step", "tokens", "elapsed_s"}


def scalars(line):
    """The W&B scalars of one metrics.jsonl line (a dict), as TensorBoard gets them."""
    out = {}
    if "val_loss" in line:
        for key, name in (("val_loss", "val/loss"), ("val_ppl", "val/ppl")):
            v = line.get(key)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out[name] = v
        for part, v in (line.get("val_loss_parts") or {}).items():  # several held-out sets
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out["val/loss/" + part] = v
        return out
    for key, v in line.items():
        if key in SKIPPED or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        out["train/" + key] = v
    return out


class Follower:
    """The complete lines appended to a file since the last call; starts over when the file is
    replaced, shrinks, or no longer holds the bytes last read (trimmed, then written past them)."""

    def __init__(self, path):
        self.path, self.ino, self.offset, self.partial, self.seen = path, None, 0, b"", b""

    def lines(self):
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with f:
            st = os.fstat(f.fileno())
            same = st.st_ino == self.ino and st.st_size >= self.offset
            if same and self.seen:
                f.seek(self.offset - len(self.seen))
                same = f.read(len(self.seen)) == self.seen
            if not same:
                self.ino, self.offset, self.partial, self.seen = st.st_ino, 0, b"", b""
            f.seek(self.offset)
            data = f.read()
        if not data:
            return []
        self.offset += len(data)
        self.seen = (self.seen + data)[-64:]
        data = self.partial + data
        *complete, self.partial = data.split(b"\n")
        return complete


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--entity", default="")
    p.add_argument("--name", default="")
    p.add_argument("--mode", default="online", choices=["online", "offline", "disabled"])
    p.add_argument("--poll", type=float, default=0.5, help="seconds between reads of metrics.jsonl")
    a = p.parse_args(argv)
    os.nice(10)  # below training, with wandb's own service process (it inherits this): CPU goes to the ranks first
    parent = os.getppid()
    run_dir = a.run_dir
    with open(os.path.join(run_dir, "wandb_run_id")) as f:
        run_id = f.read().strip()
    with open(os.path.join(run_dir, "config.toml"), "rb") as f:
        config = tomllib.load(f)
    last_path = os.path.join(run_dir, "wandb_last_step")
    last = -1
    if os.path.exists(last_path):
        with open(last_path) as f:
            last = int(f.read().strip() or -1)

    import wandb  # after the arguments: a missing wandb is a clear traceback in the sidecar's log

    run = wandb.init(id=run_id, resume="allow", project=a.project, entity=a.entity or None,
                     name=a.name or os.path.basename(os.path.abspath(run_dir)), mode=a.mode, config=config,
                     dir=run_dir, settings=wandb.Settings(console="off"))
    follower = Follower(os.path.join(run_dir, "metrics.jsonl"))
    # `last`: the steps not to send again. Within this process it trails the step sent last by
    # one line, since a training line and its evaluation share a step number; the file records the
    # step sent last, for the next start.
    pending = None  # the step of the line sent last

    def send():
        nonlocal last, pending
        sent = False
        for raw in follower.lines():
            try:
                line = json.loads(raw)
                step = int(line["step"])
            except (ValueError, KeyError, TypeError):
                continue  # a line being written when the file was trimmed: not one of ours
            if step <= last:
                continue
            if pending is not None and step > pending:
                last = pending
            values = scalars(line)
            if values:
                run.log(values, step=step)
                sent = True
            pending = step
        if sent:
            tmp = last_path + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(pending if pending is not None else last))
            os.replace(tmp, last_path)

    stdin = sys.stdin.buffer
    while True:
        readable, _, _ = select.select([stdin], [], [], a.poll)
        ended = bool(readable) and not os.read(stdin.fileno(), 4096)
        send()
        if ended or os.getppid() != parent:
            break
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
