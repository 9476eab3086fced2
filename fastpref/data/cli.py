"""``fastpref data ...``: the data recipes on JSONL files.

    fastpref data rs-dpo SAMPLES.jsonl OUT.jsonl [--tau 1.0] [--eta 0.85] [--keep-duplicates]
    fastpref data counterfactual RECORDS.jsonl OUT.jsonl [--variant contrastive] [--variant enc ...]
    fastpref data reward-augment PAIRS.jsonl OUT.jsonl [--template-file F] [--prefix-user-turn] [--keep-ties]
    fastpref data sr-augment PAIRS.jsonl OUT.jsonl [--prompt P] [--field refine_prompt]
    fastpref data sample PROMPTS.jsonl OUT.jsonl --model M [--reward-model RM [--reward-index I]] [-k 4] ...
    fastpref data counterfactual-generate PROMPTS.jsonl OUT.jsonl --model M --desired D --undesired U [--prefix]

``-`` reads stdin / writes stdout. Input is JSON Lines: UTF-8 (an opening byte-order mark allowed), one JSON
object per line, LF or CRLF line ends, blank lines ignored. A malformed record (not UTF-8, not JSON, not an
object, NaN / Infinity or a number beyond the float range, a lone surrogate, nesting beyond 100 levels, or
fields the recipe cannot use) stops the command with ``<file>:<line>: <what>`` (exit 1, nothing written)
unless ``--skip-invalid``, which reports each one on stderr and counts it. A summary of the records read,
written and skipped goes to stderr.

Output is written only once every record is ready: a file through a temporary file renamed over it (a failed
command leaves an existing output as it was), stdout in one go at the end. An existing output file is
overwritten, and the summary says so; an output that is the same file as the input (the same path, another
path to it, a symlink or a hard link) is refused before anything is read.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Callable
from typing import Any

from .io import write_jsonl
from .recipes import (
    COUNTERFACTUAL_VARIANTS,
    REWARD_AUGMENT_TEMPLATE,
    SR_DPO_PROMPT,
    counterfactual_pairs,
    rejection_sampling_pairs,
    reward_augment,
    sr_augment,
)
from .records import RecipeStats

__all__ = ["add_data_parser", "main"]


def _io_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("input", help=f"JSONL of {what} ('-' for stdin)")
    p.add_argument("output", help="JSONL to write ('-' for stdout)")


def _skip_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip malformed records (each reported on stderr with its line) instead of stopping")


def _write(args: argparse.Namespace, records: list[dict[str, Any]], name: str) -> int:
    """``write_jsonl`` to the output; say on stderr when an existing file was replaced (the overwrite policy)."""
    replaced = args.output != "-" and os.path.isfile(args.output)
    n = write_jsonl(records, args.output)
    if replaced:
        print(f"{name}: overwrote the existing {args.output}", file=sys.stderr)
    return n


def _finish(args: argparse.Namespace, records: list[dict[str, Any]], stats: RecipeStats) -> int:
    for message in stats.invalid:
        print(f"skipped invalid record: {message}", file=sys.stderr)
    _write(args, records, stats.recipe)
    print(stats.summary(), file=sys.stderr)
    return 0


def _errors(args: argparse.Namespace) -> str:
    return "skip" if args.skip_invalid else "raise"


def _run_rs_dpo(args: argparse.Namespace) -> int:
    records, stats = rejection_sampling_pairs(args.input, tau=args.tau, eta=args.eta,
                                              deduplicate=not args.keep_duplicates, errors=_errors(args),
                                              return_stats=True)
    return _finish(args, records, stats)


def _run_counterfactual(args: argparse.Namespace) -> int:
    variants = [v for item in (args.variant or ["contrastive"]) for v in item.split(",") if v]
    records, stats = counterfactual_pairs(args.input, variant=variants, errors=_errors(args), return_stats=True)
    return _finish(args, records, stats)


def _template(args: argparse.Namespace) -> str:
    if args.template_file is not None:
        with open(args.template_file, "rb") as f:
            data = f.read()
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise ValueError(f"--template-file {args.template_file}: not valid UTF-8 text "
                             f"(byte 0x{e.object[e.start]:02x} at byte {e.start + 1})") from None
        return text[:-1] if text.endswith("\n") else text
    return args.template


def _run_reward_augment(args: argparse.Namespace) -> int:
    records, stats = reward_augment(args.input, template=_template(args), as_system_message=not args.prefix_user_turn,
                                    drop_ties=not args.keep_ties, errors=_errors(args), return_stats=True)
    return _finish(args, records, stats)


def _run_sr_augment(args: argparse.Namespace) -> int:
    records, stats = sr_augment(args.input, prompt=args.prompt, field=args.field, errors=_errors(args),
                                return_stats=True)
    return _finish(args, records, stats)


def _load_lm(args: argparse.Namespace, path: str, kind: str) -> tuple[Any, Any]:
    import torch
    import transformers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cls = getattr(transformers, kind)
    kwargs = {} if args.dtype == "auto" else {"dtype": args.dtype}
    model = cls.from_pretrained(path, **kwargs).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed, progress=not args.no_progress)


def _check_reward_index(args: argparse.Namespace) -> None:
    """``--reward-index`` against the reward model's labels, read from its config before any sampling (the
    labels are known without loading the weights; sampling can take hours)."""
    if args.reward_model is None:
        if args.reward_index is not None:
            raise ValueError(f"--reward-index: only used with --reward-model, got --reward-index {args.reward_index} "
                             "without one")
        return
    import transformers

    num_labels = transformers.AutoConfig.from_pretrained(args.reward_model).num_labels
    if args.reward_index is None and num_labels != 1:
        raise ValueError(f"--reward-index: required for the reward model {args.reward_model}, which has "
                         f"num_labels={num_labels} (expected one label, the reward): which logit is the reward, "
                         f"0 to {num_labels - 1}?")
    if args.reward_index is not None and not 0 <= args.reward_index < num_labels:
        raise ValueError(f"--reward-index: expected 0 to {num_labels - 1} (the reward model {args.reward_model} has "
                         f"num_labels={num_labels}), got {args.reward_index}")


def _run_sample(args: argparse.Namespace) -> int:
    from .generation import sample_responses, score_responses

    _check_reward_index(args)
    model, tokenizer = _load_lm(args, args.model, "AutoModelForCausalLM")
    samples = sample_responses(model, tokenizer, args.input, num_samples=args.num_samples,
                               do_sample=not args.greedy, **_generation_kwargs(args))
    if args.reward_model is not None:
        rm, rm_tokenizer = _load_lm(args, args.reward_model, "AutoModelForSequenceClassification")
        samples = score_responses(samples, rm, tokenizer=rm_tokenizer, batch_size=args.batch_size * args.num_samples,
                                  reward_index=args.reward_index, progress=not args.no_progress)
    n = _write(args, samples, "sample")
    scored = " and scored" if args.reward_model is not None else ""
    print(f"sample: {n} prompts, {args.num_samples} responses each, sampled{scored}", file=sys.stderr)
    return 0


def _run_counterfactual_generate(args: argparse.Namespace) -> int:
    from .generation import counterfactual_generations

    model, tokenizer = _load_lm(args, args.model, "AutoModelForCausalLM")
    records = counterfactual_generations(model, tokenizer, args.input, desired_instruction=args.desired,
                                         undesired_instruction=args.undesired, as_system_message=not args.prefix,
                                         do_sample=args.sample, **_generation_kwargs(args))
    n = _write(args, records, "counterfactual-generate")
    print(f"counterfactual-generate: {n} prompts, control/treatment/negative generated", file=sys.stderr)
    return 0


def _device(text: str) -> str:
    """A device that holds data and is available here (a meta model would sample nothing: refused, as by
    ``fastpref bench``)."""
    from ..utils.validation import data_device  # imports torch: only when a --device is given

    try:
        data_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="causal LM: a local directory or a Hub id")
    p.add_argument("--device", type=_device, default=None,
                   help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_data_parser(subparsers: Any) -> None:
    """Add ``data`` and its recipe sub-commands to an argparse ``subparsers``; each sets ``func(args) -> int``."""
    data = subparsers.add_parser("data", help="build preference data with the seed papers' recipes",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = data.add_subparsers(dest="recipe", required=True, metavar="RECIPE")

    p = sub.add_parser("rs-dpo", help="RS-DPO pairs from k scored samples per prompt (Khaki et al. 2024)",
                       description="Input records: {prompt, responses: [k], rewards: [k]}. Keeps every ordered pair "
                       "with sigmoid((r_j - r_l)/tau) > eta.")
    _io_args(p, "{prompt, responses, rewards} records")
    p.add_argument("--tau", type=float, default=1.0, help="reward-gap temperature, > 0 (default 1.0)")
    p.add_argument("--eta", type=float, default=0.85, help="threshold, 0.5 <= eta < 1 (default 0.85)")
    p.add_argument("--keep-duplicates", action="store_true",
                   help="keep repeated pairs and pairs of identical responses (skipped and counted by default)")
    _skip_arg(p)
    p.set_defaults(func=_run_rs_dpo)

    p = sub.add_parser("counterfactual", help="Counterfactual DPO pairs (Butcher 2024)",
                       description="Input records: {prompt, control, treatment, negative[, negative_prompt]}.")
    _io_args(p, "{prompt, control, treatment, negative[, negative_prompt]} records")
    p.add_argument("--variant", action="append", metavar="VARIANT",
                   help=f"one of {', '.join(COUNTERFACTUAL_VARIANTS)} (default contrastive); repeat or "
                   "comma-separate for several")
    _skip_arg(p)
    p.set_defaults(func=_run_counterfactual)

    p = sub.add_parser("reward-augment", help="reward-augmented pairs (Zhang et al. 2024)",
                       description="Input records: {prompt, chosen, rejected, score_chosen, score_rejected}. Each "
                       "pair becomes the goal-r_w pair and the swapped goal-r_l pair.")
    _io_args(p, "scored preference pairs")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--template", default=REWARD_AUGMENT_TEMPLATE,
                       help="goal template with {score} (default: the paper's)")
    group.add_argument("--template-file", default=None, help="read the goal template from this file")
    p.add_argument("--prefix-user-turn", action="store_true",
                   help="put the goal before the first user turn instead of in a system message")
    p.add_argument("--keep-ties", action="store_true", help="keep pairs with equal scores (dropped by default)")
    _skip_arg(p)
    p.set_defaults(func=_run_reward_augment)

    p = sub.add_parser("sr-augment", help="Sr-DPO p ⊕ x twins (Yu et al. 2024)")
    _io_args(p, "preference records")
    p.add_argument("--prompt", default=SR_DPO_PROMPT, help="the prompt p (default: the paper's)")
    p.add_argument("--field", default=None,
                   help="write p ⊕ x to this field and keep 'prompt' (default: replace 'prompt')")
    _skip_arg(p)
    p.set_defaults(func=_run_sr_augment)

    p = sub.add_parser("sample", help="sample k responses per prompt (and score them) for rs-dpo")
    _io_args(p, "prompts ({prompt, ...} records)")
    _model_args(p)
    p.add_argument("-k", "--num-samples", type=int, default=4, help="responses per prompt (default 4)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (needs -k 1)")
    p.add_argument("--reward-model", default=None, help="sequence-classification reward model to score with")
    p.add_argument("--reward-index", type=int, default=None, metavar="I",
                   help="which of the reward model's logits is the reward (needed when it has several labels)")
    p.set_defaults(func=_run_sample)

    p = sub.add_parser("counterfactual-generate", help="control / treatment / negative generations (Butcher 2024)")
    _io_args(p, "prompts ({prompt, ...} records)")
    _model_args(p)
    p.add_argument("--desired", required=True, help="the desired-style instruction")
    p.add_argument("--undesired", required=True, help="the undesired-style instruction")
    p.add_argument("--prefix", action="store_true", help="prefix the instruction to the prompt (default: system msg)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.set_defaults(func=_run_counterfactual_generate)

    for parser in sub.choices.values():  # data errors: "<prog>: error: <message>" and exit status 1
        parser.set_defaults(func=_reporting_errors(parser.get_default("func"), parser.prog))


def main(argv: list[str] | None = None) -> int:
    """``python -m fastpref.data.cli RECIPE ...`` (same as ``fastpref data RECIPE ...``)."""
    parser = argparse.ArgumentParser(prog="fastpref")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["data", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


def _check_paths(args: argparse.Namespace) -> None:
    """Refuse, before reading anything, an output that cannot be written or that is one of the inputs.

    Writing renames a new file over the output, so an output that is the input file (by any path, symlink or
    hard link: compared by device and inode) would replace it. ``-`` is never the same file as anything.
    """
    output = args.output
    if output == "-":
        return
    try:
        out_stat = os.stat(output)
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(output))
        if not os.path.isdir(directory):  # fail now, not after hours of sampling
            raise FileNotFoundError(errno.ENOENT, f"No such file or directory (the directory {directory} does not "
                                    "exist)", output) from None
        return
    if stat.S_ISDIR(out_stat.st_mode):
        raise IsADirectoryError(errno.EISDIR, "Is a directory (expected the path of the JSONL file to write, or -)",
                                output)
    if not stat.S_ISREG(out_stat.st_mode):  # /dev/null, a pipe: written to, never replaced
        return
    for flag, path in (("input", args.input), ("--template-file", getattr(args, "template_file", None))):
        if path is None or path == "-":
            continue
        try:
            same = os.path.samestat(os.stat(path), out_stat)
        except OSError:  # a missing input is reported when it is read
            continue
        if same:
            raise ValueError(f"the output {output} is the same file as the {flag} {path}: refusing to overwrite "
                             "it (write to another path)")


def _os_error(e: OSError) -> str:
    """``<path>: <reason>`` (instead of ``[Errno 2] ...: '<path>'``)."""
    if e.filename is not None and e.strerror:
        return f"{e.filename}: {e.strerror}"
    return str(e)


def _reporting_errors(func: Callable[[argparse.Namespace], int], prog: str) -> Callable[[argparse.Namespace], int]:
    """Wrap a command so that bad input gives ``<prog>: error: <message>`` on stderr and exit status 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            _check_paths(args)
            return int(func(args) or 0)
        except ValueError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"{prog}: error: {_os_error(e)}", file=sys.stderr)
            return 1

    return run


if __name__ == "__main__":
    sys.exit(main())
