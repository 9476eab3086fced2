"""A tiny end-to-end DPO run with fastpref's flag off and on (nothing is downloaded).

A small random Llama built from a config, an in-process word-level tokenizer and a toy preference dataset (the
chosen answer repeats the prompt's last word). The same run is made twice — ``use_fastpref=False`` then
``use_fastpref=True`` — each in a fresh process, and the script prints the final loss, the reward accuracy
(mean of the last steps), the wall time and the peak memory (CUDA: peak allocated; CPU: the process's peak RSS,
which includes the Python runtime).

    python examples/dpo_tiny.py                       # TRL's DPOTrainer (trl 1.16) vs FastPrefDPOTrainer
    python examples/dpo_tiny.py --trainer hf          # FastPrefTrainer: materialised logits vs fused
    python examples/dpo_tiny.py --vocab 32000 --loss ipo --steps 30

With ``--trainer trl`` the "off" run is trl's own DPOTrainer (which computes log-probs with its chunked head);
with ``--trainer hf`` it materialises the ``[tokens, vocab]`` logits, so a large ``--vocab`` shows the memory
fastpref saves. Both runs agree step by step to fp32 round-off; over many Adam steps the two trajectories drift
apart slowly, as any two fp32 implementations of the same loss do, so the final numbers differ a little.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(flag: bool, opts: argparse.Namespace) -> dict[str, float]:
    """One training run; returns final loss, reward accuracy, seconds and peak memory (MiB)."""
    import datasets
    import torch
    import transformers

    from fastpref.testing.toy import toy_llama, toy_preference_records, toy_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(opts.threads)
    device = opts.device
    tok = toy_tokenizer()

    def model():
        return toy_llama(tok, hidden_size=opts.hidden, num_layers=opts.layers, vocab_size=opts.vocab, seed=0)

    records = toy_preference_records(opts.pairs, seed=0, max_words=opts.max_words)
    common = dict(output_dir="/tmp/fastpref-example", max_steps=opts.steps, logging_steps=1, report_to=[],
                  learning_rate=opts.lr, per_device_train_batch_size=opts.batch, save_strategy="no",
                  use_cpu=device == "cpu", seed=0, data_seed=0, disable_tqdm=True, lr_scheduler_type="constant")
    if opts.trainer == "trl":
        from datasets import Dataset

        from fastpref.integrations.trl import FastPrefDPOConfig, FastPrefDPOTrainer

        args = FastPrefDPOConfig(**common, bf16=device != "cpu", gradient_checkpointing=False, use_fastpref=flag,
                                 loss_type=[opts.loss], beta=opts.beta)
        trainer = FastPrefDPOTrainer(model(), ref_model=model(), args=args, train_dataset=Dataset.from_list(records),
                                     processing_class=tok)
    else:
        from fastpref.integrations.hf import FastPrefTrainer, FastPrefTrainingArguments

        args = FastPrefTrainingArguments(**common, bf16=device != "cpu", use_fastpref=flag, loss_type=[opts.loss],
                                         beta=opts.beta)
        trainer = FastPrefTrainer(model(), args, train_dataset=records, processing_class=tok)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # the table below is the output
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    logs = [h for h in trainer.state.log_history if "loss" in h]
    tail = logs[-max(1, len(logs) // 4):]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"loss": logs[-1]["loss"], "reward_acc": sum(h["rewards/accuracies"] for h in tail) / len(tail),
            "seconds": seconds, "peak_mib": peak}


def _child(flag: bool, opts: argparse.Namespace, queue: mp.Queue) -> None:
    queue.put(run(flag, opts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=["trl", "hf"], default="trl")
    parser.add_argument("--loss", default="sigmoid", help="sigmoid, ipo, hinge, robust, sr_dpo, sr_ipo, ...")
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8, help="pairs per step")
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help="LM-head rows (default: the tokenizer's 162)")
    parser.add_argument("--max-words", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    opts = parser.parse_args()
    if opts.device is None:
        import torch

        opts.device = "cuda" if torch.cuda.is_available() else "cpu"

    ctx = mp.get_context("spawn")  # a fresh process per run: independent peak-memory figures
    print(f"trainer={opts.trainer} loss={opts.loss} device={opts.device} steps={opts.steps} batch={opts.batch} "
          f"hidden={opts.hidden} vocab={opts.vocab or 'tokenizer'}")
    print(f"{'use_fastpref':>12} {'final loss':>10} {'reward acc':>10} {'time (s)':>9} {'peak (MiB)':>10}")
    for flag in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=_child, args=(flag, opts, queue))
        proc.start()
        result = queue.get()
        proc.join()
        print(f"{flag!s:>12} {result['loss']:>10.4f} {result['reward_acc']:>10.3f} {result['seconds']:>9.2f} "
              f"{result['peak_mib']:>10.1f}")


if __name__ == "__main__":
    main()
