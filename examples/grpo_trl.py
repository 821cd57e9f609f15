"""GRPO with TRL against a live rbr-serve: the policy learns from the service's rewards, end to end.

The script starts `rbr serve` itself (embedded grader with the learned heads, default policy and weights, and the
embedded helpful-only reward model in the same process: `--rm vllm`; `--rm none` serves rm_score 0), trains the
policy with TRL's `GRPOTrainer` on the *train* prompts of the packaged split (the eval prompts stay held out for
`rbr eval policy`), logs the rewards and the completion-class fractions per step, saves the trained policy and a
plot, and stops the service.

`--reward` picks what the policy learns from, out of one service response per batch: `total` (the service's
`reward` = rm_score + RBR, the paper's RBR+RM), `rm` (rm_score alone: the helpful-only baseline) or `rbr`
(rbr_reward alone). All three are logged every step whichever is chosen (`rbr_reward/reward`,
`rbr_reward/rm_score`, `rbr_reward/rbr_reward`). `--beta` is TRL's KL coefficient to the starting policy.

    python examples/grpo_trl.py --out out/grpo                        # the run (about an hour on 2 CPU cores)
    python examples/grpo_trl.py --out out/grpo-rm --reward rm         # helpful-only: the RM's score alone
    python examples/grpo_trl.py --out out/grpo-control --control      # same settings, rewards shuffled in a batch
    python examples/grpo_trl.py --out /tmp/smoke --max-steps 2        # a smoke run
    rbr eval policy out/grpo/policy --out out/eval-grpo               # then evaluate on held-out prompts

`--control` keeps everything the same but shuffles the rewards within each batch before TRL sees them, so the
rewards carry no information about the completions: whatever changes in that run is training noise, the baseline
the real run must beat. Needs `pip install trl` (scripts/setup.sh installs it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

DEFAULT_POLICY = "HuggingFaceTB/SmolLM2-135M-Instruct (the embedded model)"
# --reward: which field of the service's result the policy is trained on
REWARD_FIELDS = {"total": "reward", "rm": "rm_score", "rbr": "rbr_reward"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/grpo"), help="Run folder: policy/, log, plot, service log.")
    ap.add_argument("--model", default=None, help=f"Policy to train (default: {DEFAULT_POLICY}).")
    ap.add_argument("--max-steps", type=int, default=200, help="Optimizer steps.")
    ap.add_argument("--prompts-per-step", type=int, default=2, help="Prompts per step; each gets --num-generations.")
    ap.add_argument("--num-generations", type=int, default=4, help="Completions per prompt (the GRPO group).")
    ap.add_argument("--max-completion-length", type=int, default=64, help="Longest completion in tokens.")
    ap.add_argument("--learning-rate", type=float, default=2e-5, help="AdamW learning rate.")
    ap.add_argument("--beta", type=float, default=0.04,
                    help="KL coefficient to the starting policy (TRL's beta; 0: no reference model, no KL term).")
    ap.add_argument("--reward", choices=sorted(REWARD_FIELDS), default="total",
                    help="What the policy is trained on: the served total, rm_score alone, or rbr_reward alone.")
    ap.add_argument("--rm", choices=["vllm", "none"], default="vllm",
                    help="The service this script starts: the embedded RM in process (vllm), or rm_score 0 (none).")
    ap.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature during training.")
    ap.add_argument("--seed", type=int, default=0, help="Seed for TRL, the data order and the control's shuffles.")
    ap.add_argument("--control", action="store_true",
                    help="Shuffle rewards within each batch: the same run with rewards that carry no information.")
    ap.add_argument("--port", type=int, default=8031, help="Port for the rbr serve this script starts.")
    ap.add_argument("--service-url", default=None,
                    help="Use an rbr-serve that is already running instead of starting one.")
    ap.add_argument("--split", default="train", choices=["train", "all"], help="Which packaged prompts to train on.")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores).")
    ap.add_argument("--time-budget-min", type=float, default=60.0,
                    help="Stop after this many minutes of training even if --max-steps is not reached (run.json "
                         "says at which step); 0: no limit.")
    return ap.parse_args(argv)


# ---- the service ---------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the service's child before exec: SIGTERM when this trainer dies, even by SIGKILL (the OOM killer), which
    `finally` cannot catch; otherwise the service and its engines outlive it (seen: 3 engines left, ~7 GB)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG


def start_service(port: int, log_path: Path, timeout: float = 900.0, rm: str = "vllm") -> tuple[subprocess.Popen, str]:
    """`rbr serve` on loopback with the heads grader and the embedded RM (or rm_score 0); waits for /readyz."""
    env = {**os.environ, "RBR_HEADS": "auto", "RBR_HOST": "127.0.0.1", "RBR_PORT": str(port)}
    if rm == "vllm":  # RBR_RM_MODEL unset: the embedded helpful-only RM
        env.update(RBR_RM_ENGINE="vllm")
        env.pop("RBR_RM_MODEL", None)
    else:
        env.update(RBR_RM_ENGINE="none", RBR_DEFAULT_RM_SCORE="0")
    env.pop("RBR_REDIS_URL", None)  # the in-process cache is enough for one trainer
    rbr = Path(sys.executable).with_name("rbr")
    log = log_path.open("w")
    proc = subprocess.Popen([str(rbr), "serve"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True, preexec_fn=_die_with_parent)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"rbr serve exited with {proc.returncode}; see {log_path}")
            try:
                resp = httpx.get(f"{url}/readyz", timeout=5)
                if resp.status_code == 200:
                    return proc, url
                if resp.status_code == 503 and "failed to start" in resp.text:
                    raise RuntimeError(f"rbr serve: {resp.json()['error']['message']}; see {log_path}")
            except httpx.HTTPError:
                pass
            time.sleep(2)
        raise RuntimeError(f"rbr serve not ready after {timeout:.0f} s; see {log_path}")
    except BaseException:  # not ready, or this script was stopped while waiting: take the service down too
        stop_service(proc)
        raise


def stop_service(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- data, reward, logging -----------------------------------------------------------------------------------


def train_dataset(split: str, seed: int) -> Any:
    from datasets import Dataset

    from rbr_model.prompt_set import load_prompts

    prompts = load_prompts(split=None if split == "all" else split)
    rows = [{"prompt": list(p.messages), "response_type": p.response_type, "prompt_id": p.prompt_id}
            for p in prompts]
    random.Random(seed).shuffle(rows)
    return Dataset.from_list(rows)


def chosen(reward_func: Any, which: str) -> Any:
    """The served results' `REWARD_FIELDS[which]` for TRL, and the batch means of all three logged every step.

    `reward_func` is rbr_client's TRL function: it returns the totals and keeps the batch's results, so one service
    call gives every field; a failed batch (None per sample) passes through."""
    field = REWARD_FIELDS[which]

    async def chosen_rewards(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        totals = await reward_func(prompts, completions, **kwargs)
        results = reward_func.last_results
        if len(results) != len(totals):
            return totals
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):  # rm_score and rbr_reward are logged by rbr_client already; the total here
            log_metric(f"{reward_func.__name__}/reward", sum(r.reward for r in results) / len(results))
        return [float(getattr(r, field)) for r in results]

    chosen_rewards.__name__ = reward_func.__name__
    return chosen_rewards


def shuffled(reward_func: Any, seed: int) -> Any:
    """The control: the service's rewards for the batch, permuted so that none belongs to its completion."""
    rng = random.Random(seed)

    async def shuffled_rewards(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float | None]:
        rewards = await reward_func(prompts, completions, **kwargs)
        rng.shuffle(rewards)
        return rewards

    shuffled_rewards.__name__ = reward_func.__name__
    return shuffled_rewards


def step_logger(path: Path, max_steps: int) -> Any:
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):
        """Every logged step as one JSON line, and a one-line progress report."""

        def __init__(self) -> None:
            self.start = time.monotonic()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if not logs or "loss" not in logs and "reward" not in logs:
                return
            row = {"step": state.global_step, "elapsed_s": round(time.monotonic() - self.start, 1), **logs}
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            ideal = logs.get("rbr_reward/class/ideal")
            parts = "  ".join(f"{k} {logs.get('rbr_reward/' + k, float('nan')):+.3f}"
                              for k in ("reward", "rm_score", "rbr_reward"))
            print(f"step {state.global_step}/{max_steps}  trained on {logs.get('reward', float('nan')):+.3f}  {parts}  "
                  f"ideal {ideal if ideal is not None else float('nan'):.2f}  "
                  f"{row['elapsed_s']:.0f} s", flush=True)

    return StepLog()


def time_budget(minutes: float) -> Any:
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Ends training after the first step that finishes past the budget."""

        def __init__(self) -> None:
            self.deadline = time.monotonic() + 60 * minutes

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if time.monotonic() > self.deadline:
                control.should_training_stop = True

    return TimeBudget()


def plot_curves(log_path: Path, out: Path, title: str) -> Path | None:
    """Reward (served, before any shuffle) and class fractions per step, smoothed over 10 steps."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    steps = np.array([r["step"] for r in rows])

    def series(key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in rows], dtype=float)

    def smooth(v: np.ndarray, k: int = 10) -> np.ndarray:
        if len(v) < k:
            return v
        return np.convolve(np.nan_to_num(v), np.ones(k) / k, mode="valid")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    for i, (key, label) in enumerate((("reward", "served total"), ("rm_score", "served rm_score"),
                                      ("rbr_reward", "served RBR reward"))):
        served = series(f"rbr_reward/{key}")
        if np.isnan(served).all():
            continue
        ax.plot(steps, served, alpha=0.3, color=f"C{i}")
        ax.plot(steps[len(steps) - len(smooth(served)):], smooth(served), color=f"C{i}", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward of the batch")
    ax.legend()
    ax.grid(alpha=0.3)
    classes = sorted({k for r in rows for k in r if k.startswith("rbr_reward/class/")})
    for i, key in enumerate(classes):
        v = series(key)
        bx.plot(steps[len(steps) - len(smooth(v)):], smooth(v), color=f"C{i}", label=key.split("/")[-1])
    bx.set_xlabel("step")
    bx.set_ylabel("mean class probability (10-step mean)")
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- main ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A SIGTERM (timeout, kill) unwinds through `finally`, so the service this script started stops with it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    import torch
    from trl import GRPOConfig, GRPOTrainer

    from rbr_client import trl_reward_func
    from rbr_model import models

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log_path = args.out / "steps.jsonl"
    log_path.unlink(missing_ok=True)
    model = args.model or str(models.prepare())
    proc = None
    try:
        if args.service_url:
            url = args.service_url
        else:
            print(f"starting rbr serve on port {args.port} (log: {args.out / 'service.log'})", flush=True)
            proc, url = start_service(args.port, args.out / "service.log", rm=args.rm)
        reward = chosen(trl_reward_func(url, response_type_key="response_type", name="rbr_reward"), args.reward)
        if args.control:
            reward = shuffled(reward, args.seed)
        batch = args.prompts_per_step * args.num_generations
        config = GRPOConfig(
            output_dir=str(args.out / "trainer"), max_steps=args.max_steps, per_device_train_batch_size=batch,
            num_generations=args.num_generations, max_completion_length=args.max_completion_length,
            learning_rate=args.learning_rate, beta=args.beta, temperature=args.temperature, seed=args.seed,
            data_seed=args.seed, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
            disable_tqdm=True, lr_scheduler_type="constant", warmup_steps=0,
        )
        callbacks = [step_logger(log_path, args.max_steps)]
        if args.time_budget_min:
            callbacks.append(time_budget(args.time_budget_min))
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=config,
                              train_dataset=train_dataset(args.split, args.seed), callbacks=callbacks)
        started = time.monotonic()
        trainer.train()
        policy_dir = args.out / "policy"
        trainer.save_model(str(policy_dir))
        trainer.processing_class.save_pretrained(str(policy_dir))
        summary = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "model": model, "service": url, "train_seconds": round(time.monotonic() - started, 1),
                   "steps": trainer.state.global_step,
                   "policy": str(policy_dir)}
        (args.out / "run.json").write_text(json.dumps(summary, indent=1) + "\n")
        kind = f"trained on {REWARD_FIELDS[args.reward]}, beta {args.beta}" + (
            ", control: rewards shuffled within each batch" if args.control else "")
        plot = plot_curves(log_path, args.out, f"GRPO on {Path(model).name}, {kind}")
        print(f"saved the policy to {policy_dir}; log {log_path}; plot {plot}", flush=True)
    finally:
        if proc is not None:
            stop_service(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
