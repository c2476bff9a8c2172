"""What evaluate.py writes and prints from its figures: eval.json (an Evaluation), and rendered from it alone the plots
(training curves, bpb against the baselines), report.md and the summary on the terminal.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from bookgpt.config import UserError, atomic_write_bytes, atomic_write_json
from bookgpt.eval.baselines import baseline_label
from bookgpt.eval.textstats import COPY_CAP, MISSPELL_CAP, NAMES
from bookgpt.eval.twosample import HEADLINE


@dataclass
class Evaluation:
    """eval.json, one field per key in the file's order: each key is named here, filled by keyword in evaluate.py
    (a key it lacks is an error there, not a gap here) and read back, Evaluation(**json), to render the rest."""
    run: dict[str, Any]              # the checkpoint: its folder, file, step, parameters
    data: dict[str, Any]             # the data folder, the headline split and its size
    settings: dict[str, Any]         # EvalConfig's values, and the stride, context, device and dtype used
    likelihood: dict[str, float]     # the headline split's full pass (likelihood_figures)
    dynamic: dict[str, Any]          # dynamic evaluation ({} = off), and its n-gram mixture
    mixture: dict[str, Any]          # the model mixed with an n-gram ({} = off)
    ensemble: dict[str, Any]         # the model mixed with other runs ({} = off), and its n-gram mixture
    baselines: dict[str, dict]       # the headline split's ({} = off)
    splits: dict[str, dict]          # each scored split's likelihood and baselines, the headline first
    sampling: dict[str, Any]         # the generation checks' temperature, where it came from, the caps' ratios
    memorisation: dict[str, Any]     # of the generated and the real continuations
    style: dict[str, Any]            # of the generated and the real continuations and the book, and themes
    curves: dict[str, Any]           # overfitting_summary of metrics.jsonl
    samples: list[dict[str, str]]    # each prompt, its generated and its real continuation
    timings: dict[str, float]        # seconds per stage
    two_sample: dict[str, Any] = field(default_factory=dict)  # can a classifier tell generated from real ({} = off)


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def overfitting_summary(evals: list[dict]) -> dict[str, Any]:
    """Where val stopped improving and how far it and the train/val gap moved afterwards."""
    if not evals:
        return {"evals": 0}
    best, last = min(evals, key=lambda r: r["val_loss"]), evals[-1]
    return {"evals": len(evals), "best_iter": best["iter"], "best_val_loss": best["val_loss"],
            "best_val_bpb": best.get("val_bpb"), "last_iter": last["iter"], "last_val_loss": last["val_loss"],
            "evals_after_best": sum(r["iter"] > best["iter"] for r in evals),
            "val_rise_after_best": last["val_loss"] - best["val_loss"],
            "gap_at_best": best["val_loss"] - best["train_loss"], "gap_at_last": last["val_loss"] - last["train_loss"]}


def plot_curves(train: list[dict], evals: list[dict], summary: dict[str, Any]) -> bytes:
    """Loss against step: train (per log line and per eval) and val, best val marked."""
    from matplotlib.figure import Figure  # the OO API: no pyplot, no global backend state

    ax = Figure(figsize=(8, 4.5)).subplots()
    if train:
        ax.plot([r["iter"] for r in train], [r["loss"] for r in train], color="tab:blue", alpha=0.3, lw=1,
                label="train (batch)")
    if evals:
        its = [r["iter"] for r in evals]
        ax.plot(its, [r["train_loss"] for r in evals], "o-", color="tab:blue", ms=3, label="train (eval)")
        ax.plot(its, [r["val_loss"] for r in evals], "o-", color="tab:orange", ms=3, label="val (eval)")
        ax.axvline(summary["best_iter"], color="tab:red", ls="--", lw=1,
                   label=f"best val {summary['best_val_loss']:.4f} at step {summary['best_iter']}")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title="train vs val loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(ax.figure)


def plot_bpb(model_bpb: float, baselines: dict[str, dict]) -> bytes:
    """Horizontal bars: the model's held-out bpb beside every baseline, best at the top."""
    from matplotlib.figure import Figure

    rows = sorted([("this model", model_bpb)] + [(baseline_label(k), v["bpb"]) for k, v in baselines.items()],
                  key=lambda r: -r[1])
    ax = Figure(figsize=(8, 0.35 * len(rows) + 1.2)).subplots()
    colors = ["tab:red" if name == "this model" else "tab:gray" for name, _ in rows]
    bars = ax.barh([name for name, _ in rows], [v for _, v in rows], color=colors)
    ax.bar_label(bars, fmt="%.3f", padding=3, fontsize=8)
    ax.set(xlabel="bits per byte on the held-out split (lower is better)", xlim=(0, max(v for _, v in rows) * 1.15))
    return _png(ax.figure)


def _fence(text: str) -> str:
    return "```text\n" + text.replace("```", "'''") + "\n```"


def _md_table(header: Sequence[str], rows: list[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


SPLIT_NOTES = {  # what the headline split's figure is
    "test": ("**test** is the headline: no choice (checkpoint, early stop, recipe, sampling setting) has read it; val "
             "chose them, so its figure is the selected model's own score."),
    "val": ("On **val**, the split that chose the checkpoint (and, for the shipped recipes, the recipe): the selected "
            "model's own score, not an unbiased estimate.")}


def side_by_side(splits: dict[str, dict]) -> list[tuple[str, ...]]:
    """Each likelihood measure as one row, with a column per split."""
    rows = {"bits per byte (bpb)": "{bpb:.4f}", "loss (nats/token)": "{loss:.4f}", "perplexity per token": "{ppl:.3f}",
            "bits per character": "{bpc:.4f}", "perplexity per character": "{ppl_char:.3f}",
            "tokens / chars / bytes scored": "{tokens:,} / {chars:,} / {bytes:,}"}
    return [(label, *(fmt.format(**sp["likelihood"]) for sp in splits.values())) for label, fmt in rows.items()]


def memo_rows(mem: dict[str, dict]) -> list[tuple[str, str, str]]:
    g, r = mem["generated"], mem["reference"]
    return [("char 30-grams found in train", f"{g['char30_share']:.1%}", f"{r['char30_share']:.1%}"),
            ("char 30-grams found in train, count", f"{g['char30_found']:,}", f"{r['char30_found']:,}"),
            ("word 8-grams found in train", f"{g['word8_share']:.1%}", f"{r['word8_share']:.1%}"),
            ("longest verbatim span (chars), max", str(g["longest_span"]), str(r["longest_span"])),
            ("longest verbatim span (chars), mean", f"{g['longest_span_mean']:.1f}", f"{r['longest_span_mean']:.1f}")]


def caps_line(sampling: dict[str, Any]) -> str:
    return (f"The samples copy 30-character spans of the training text {sampling['copy_ratio']:.2f}x and misspell "
            f"{sampling['misspell_ratio']:.2f}x as often as the real continuations (caps: {COPY_CAP:g}x and "
            f"{MISSPELL_CAP:g}x).")


def temperature_table(sampling: dict[str, Any]) -> list[str]:
    """The temperatures tried on val prompts, when the temperature was chosen there."""
    if not sampling.get("trials"):
        return []
    told = all("distinguishable" in t for t in sampling["trials"])
    rows = [(f"{t['temperature']:g}" + (" (chosen)" if t["temperature"] == sampling["temperature"] else ""),
             f"{t['copy_ratio']:.2f}x", f"{t['misspell_ratio']:.2f}x")
            + ((f"{t['distinguishable']:.2f}",) if told else ()) for t in sampling["trials"]]
    rule = ("the one a classifier tells from the real text least often of those whose samples stay within both caps"
            if told else "the highest whose samples stay within both caps")
    return [f"The temperature was chosen on {sampling['num_prompts']} val prompts: {rule} (or, if none does, the "
            "nearest the caps), saved as the run's own for sample.py and app.py.", "",
            _md_table(("temperature", "copies vs real", "misspells vs real") + (("told apart",) if told else ()),
                      rows), ""]


def _acc(x: float | None) -> str:
    """An accuracy of the two-sample test, or '-' where too few prompts left it unmeasured."""
    return "-" if x is None else f"{x:.2f}"


def two_sample_lines(ts: dict[str, Any]) -> list[str]:
    """The two-sample test of style in a sentence, and its table."""
    if "skipped" in ts:
        return [f"Two-sample test of style: skipped ({ts['skipped']}).", ""]
    rows = [(name, _acc(told), _acc(ts["real_vs_real"][name])) for name, told in ts["generated_vs_real"].items()]
    return [f"A classifier (TF-IDF n-grams, logistic regression) tells {ts['pieces']} generated pieces of "
            f"{ts['chars']} characters from the real continuation's pieces at the same places "
            f"{_acc(ts['generated_vs_real'][HEADLINE])} of the time ({ts['folds']}-fold cross-validation over "
            f"{ts['prompts']} prompts, each prompt held out whole; 0.50 = it cannot tell). The control, the real "
            f"continuations of the even-numbered prompts against the odd-numbered ones' ({ts['control_pieces']} "
            f"pieces a side; the prompts lie in order through the split): {_acc(ts['real_vs_real'][HEADLINE])}.", "",
            _md_table(("features", "generated vs real", "real vs real (control)"), rows), ""]


def style_rows(st: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    b, g, r = st["book"], st["generated"], st["reference"]
    gd, rd = st["generated_distance"], st["reference_distance"]
    tvds = {"word_len_tvd": "word-length", "sentence_len_tvd": "sentence-length", "punct_mix_tvd": "punctuation-mix"}
    rows = [(f"{what} TVD to book", "0", f"{gd[key]:.3f}", f"{rd[key]:.3f}") for key, what in tvds.items()]
    for key, label, fmt in (("mean_word_len", "mean word length", "{:.2f}"),
                            ("mean_sentence_len", "mean sentence length (words)", "{:.1f}"),
                            ("quotes_per_kchar", "quote marks per 1000 chars", "{:.1f}"),
                            ("dialogue_share", "share of text inside quotes", "{:.1%}"),
                            ("unknown_word_share", "words not in the train text", "{:.2%}")):
        rows.append((label, fmt.format(b[key]), fmt.format(g[key]), fmt.format(r[key])))
    rows.append(("punctuation marks per 1000 chars", *(f"{sum(s['punct_per_kchar'].values()):.1f}" for s in (b, g, r))))
    rows += [(f"distinct-{n} (per sample)", "-", f"{g['distinct'][n]:.3f}", f"{r['distinct'][n]:.3f}") for n in "123"]
    rows.append(("main names per 1000 words", *(f"{sum(s['names_per_kword'].values()):.1f}" for s in (b, g, r))))
    return rows


def theme_rows(th: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rate, eb, cb = th["entities_per_kword"], th["entities_jsd_to_book"], th["content_jsd_to_book"]
    rows = [("names and places per 1000 words", f"{rate['book']:.1f}", f"{rate['generated']:.1f}", f"{rate['reference']:.1f}"),
            ("names/places: JSD to the book", "0", f"{eb['generated']:.3f}", f"{eb['reference']:.3f}"),
            ("content words: JSD to the book", "0", f"{cb['generated']:.3f}", f"{cb['reference']:.3f}"),
            ("names/places: JSD to real text", "-", f"{th['entities_jsd_to_real']:.3f}", "0"),
            ("content words: JSD to real text", "-", f"{th['content_jsd_to_real']:.3f}", "0")]
    for pp, label in ((th["entities_per_prompt"], "names/places"), (th["content_per_prompt"], "content words")):
        if pp["own"] is not None and pp["shuffled"] is not None:
            rows += [(f"{label}, own prompt's real", "-", f"{pp['own']:.3f}", "0"),
                     (f"{label}, other prompt's real", "-", f"{pp['shuffled']:.3f}", "-")]
    return rows


def output_names(ckpt: str, ensemble: Sequence[str] = ()) -> dict[str, str]:
    """The files an evaluation of checkpoint `ckpt` writes: best.pt's plain, the others' named after them, and
    an evaluation with --ensemble its own (_ensemble), so the run's single-model figures stay where they were."""
    tag = ("" if ckpt == "best" else f"_{ckpt}") + ("_ensemble" if ensemble else "")
    return {"json": f"eval{tag}.json", "report": f"report{tag}.md", "bpb_plot": f"bpb_baselines{tag}.png",
            "curves": "loss_curves.png"}


def dynamic_label(dyn: dict[str, Any]) -> str:
    return (f"lr {dyn['lr']:g}" + (f", decay {dyn['decay']:g}" if dyn.get("decay") else "")
            + (", rms" if dyn.get("method") == "rms" else ""))


def mixture_label(mix: dict[str, Any]) -> str:
    return f"order {mix['order']}, model weight {mix['weight']:.3f}"


def ensemble_label(ens: dict[str, Any]) -> str:
    return f"{len(ens['runs'])} runs, weights {' / '.join(f'{w:.3f}' for w in ens['weights'])}"


def write(ev: Evaluation, train_rows: list[dict], eval_rows: list[dict]) -> None:
    """eval.json, report.md and their plots into the run's folder (named by output_names), each atomically."""
    out_dir, names = Path(ev.run["out_dir"]), output_names(ev.settings["ckpt"], ev.settings["ensemble"])
    plots = {names["curves"]: plot_curves(train_rows, eval_rows, ev.curves)} if eval_rows else {}
    if ev.baselines:
        plots[names["bpb_plot"]] = plot_bpb(ev.likelihood["bpb"], ev.baselines)
    try:
        for name, png in plots.items():
            atomic_write_bytes(out_dir / name, png)
        atomic_write_bytes(out_dir / names["report"], render(ev, names).encode("utf-8"))
        atomic_write_json(out_dir / names["json"], vars(ev))
    except OSError as e:
        raise UserError(f"cannot write the report into {out_dir}: {e.strerror or e}") from None


def render(ev: Evaluation, names: dict[str, str]) -> str:
    """report.md, section by section."""
    md = likelihood_md(ev) + baselines_md(ev, names) + overfitting_md(ev.curves, names)
    if ev.samples:
        md += generations_md(ev)
    timing = _md_table(("stage", "seconds"), [(k, f"{v:.1f}") for k, v in ev.timings.items()])
    return "\n".join(md + ["## Timing", "", timing, ""])


def likelihood_md(ev: Evaluation) -> list[str]:
    """The header and each split's full pass; beside the headline dynamic evaluation, the n-gram mixture, the ensemble."""
    run, data, s = ev.run, ev.data, ev.settings
    md = [f"# Evaluation of `{run['out_dir']}`", "",
          f"Checkpoint `{run['checkpoint']}` (step {run['iter_num']}, {run['params']:,} parameters), "
          f"{data['tokenizer']} tokenizer (vocab {data['vocab_size']}), `{data['data_dir']}` split "
          f"**{data['split']}**. Context: block_size {s['block_size']}, stride {s['stride']} (every token scored "
          f"once with at least {s['block_size'] - s['stride']} tokens of context), {s['device']} / {s['dtype']}.", "",
          "## Held-out likelihood", "", SPLIT_NOTES[data["split"]], "",
          _md_table(("measure", *ev.splits), side_by_side(ev.splits)), ""]
    split, bpb = data["split"], ev.likelihood["bpb"]
    against = "against the static figure above, which stays the headline"

    def with_ngram(fig: dict[str, Any], where: str) -> str:
        return (f" Mixed with an n-gram as {where} ({mixture_label(fig['mixture'])}, fitted on val the same way): "
                f"**{fig['mixture']['bpb']:.4f} bpb**." if fig.get("mixture") else "")

    if dyn := ev.dynamic:
        step = ("one step of the gradient divided by its RMS on train" if dyn.get("method") == "rms"
                else "one SGD step") + (", pulled back towards the trained weights," if dyn.get("decay") else "")
        by_lr = ", ".join(f"{k}: {v:.4f}" if v is not None else f"{k}: diverged" for k, v in dyn["val_bpb_by_lr"].items())
        md += [f"With dynamic evaluation ({step} after each window, on the tokens just scored; each token is still "
               f"predicted before the model learns from it), the setting chosen on val ({by_lr} bpb): "
               f"{dynamic_label(dyn)}, **{dyn['bpb']:.4f} bpb** on {split}, {dyn['bpb'] - bpb:+.4f} {against}."
               + with_ngram(dyn, "below"), ""]
    if mix := ev.mixture:
        by_order = ", ".join(f"order {k}: {v:.4f}" for k, v in mix["val_bpb_by_order"].items())
        md += [f"Mixed token by token with a modified Kneser-Ney n-gram over the model's own tokens, fitted on train "
               f"(p = w p_model + (1 - w) p_ngram; weight and order fitted on val: {by_order} bpb): "
               f"{mixture_label(mix)}, **{mix['bpb']:.4f} bpb** on {split}, {mix['bpb'] - bpb:+.4f} {against} "
               f"(the n-gram alone: {mix['ngram_bpb']:.4f}).", ""]
    if ens := ev.ensemble:
        alone = ", ".join(f"`{r}` {b:.4f}" for r, b in zip(ens["runs"], ens["runs_bpb"]))
        md += [f"An ensemble, mixed token by token with runs trained on the same data (p = sum of w_k p_k; the "
               f"weights fitted on val, {ens['val_bpb']:.4f} bpb there): {ensemble_label(ens)}, "
               f"**{ens['bpb']:.4f} bpb** on {split}, {ens['bpb'] - bpb:+.4f} {against}. The runs alone on "
               f"{split}: {alone}." + with_ngram(ens, "above"), ""]
    return md


def baselines_md(ev: Evaluation, names: dict[str, str]) -> list[str]:
    if not ev.baselines:
        return []
    splits = ev.splits.values()
    rows = [("**this model**", *(f"**{sp['likelihood']['bpb']:.4f}**" for sp in splits))]
    rows += [(baseline_label(k), *(f"{sp['baselines'][k]['bpb']:.4f}" for sp in splits))
             for k in sorted(ev.baselines, key=lambda k: ev.baselines[k]["bpb"])]
    return ["## Baselines", "",
            "Fitted on (or, for compressors, given) the train split; bits per UTF-8 byte of each held-out split.", "",
            _md_table(("model", *(f"bpb on {name}" for name in ev.splits)), rows), "", f"![bpb]({names['bpb_plot']})", ""]


def overfitting_md(ov: dict[str, Any], names: dict[str, str]) -> list[str]:
    if not ov.get("evals"):
        return ["## Overfitting", "", "No evaluations in metrics.jsonl.", ""]
    if ov["evals_after_best"]:
        trend = (f"Val loss stopped improving at step {ov['best_iter']} ({ov['best_val_loss']:.4f}); "
                 f"{ov['evals_after_best']} evaluation(s) followed, the last (step {ov['last_iter']}) at "
                 f"{ov['last_val_loss']:.4f} ({ov['val_rise_after_best']:+.4f}).")
    else:
        trend = (f"Val loss was still improving at the last evaluation (step {ov['best_iter']}, "
                 f"{ov['best_val_loss']:.4f}): no overfitting yet.")
    return ["## Overfitting", "",
            f"{trend} Val minus train loss: {ov['gap_at_best']:+.4f} at the best step, {ov['gap_at_last']:+.4f} at "
            "the last. (train.py's losses are means over random windows; the full pass above is the precise figure.)",
            "", f"![loss curves]({names['curves']})", ""]


def generations_md(ev: Evaluation) -> list[str]:
    """Memorisation, style and themes of the generated continuations beside the real ones, and the samples."""
    s, sampling, st, th = ev.settings, ev.sampling, ev.style, ev.style["themes"]
    names = ", ".join(f"{n} {st['book']['names_per_kword'][n]:.1f}/{st['generated']['names_per_kword'][n]:.1f}/"
                      f"{st['reference']['names_per_kword'][n]:.1f}" for n in NAMES)
    columns = ("measure", "book (train)", "generated", "real continuation")
    md = ["## Memorisation", "",
          f"{len(ev.samples)} prompts of {s['prompt_chars']} characters from the {ev.data['split']} split, continued "
          f"by {s['gen_tokens']} tokens (temperature {sampling['temperature']:g}: {sampling['source']}; top_k "
          f"{s['top_k']}, top_p {s['top_p']}, seed {s['seed']}), against the real continuation of the same length. "
          f"{caps_line(sampling)}", "", *temperature_table(sampling),
          _md_table(("measure", "generated", "real continuation"), memo_rows(ev.memorisation)), "",
          "Longest verbatim span in the generated text:", "",
          _fence(ev.memorisation["generated"]["longest_span_text"]), "",
          *(["## Can a reader tell?", "", *two_sample_lines(ev.two_sample)] if ev.two_sample else []),
          "## Style", "", _md_table(columns, style_rows(st)), "",
          f"Names per 1000 words (book / generated / real): {names}", "",
          "## Themes", "",
          "Who and where the text names (the principal characters and places) and what it talks about (its "
          "words without function words), as Jensen-Shannon divergences in bits (0 the same mix, 1 nothing in "
          "common). Per prompt, each generated continuation is held against its own prompt's real continuation "
          "and against another prompt's (a shuffled-prompt control; the mean JSD of each): closer to its own "
          "means it follows its prompt.", "", _md_table(columns, theme_rows(th)), "",
          f"Most frequent content words, generated: {', '.join(th['top_content_words']['generated'])}; "
          f"real: {', '.join(th['top_content_words']['reference'])}.", "",
          "## Samples", ""]
    for i, smp in enumerate(ev.samples, start=1):
        md += [f"### Sample {i}", "", "Prompt:", "", _fence(smp["prompt"]), "", "Generated:", "",
               _fence(smp["generated"]), "", "Real continuation:", "", _fence(smp["reference"]), ""]
    return md


def print_summary(ev: Evaluation) -> None:
    lk, splits = ev.likelihood, ev.splits

    def table(header: Sequence[str], rows: list[Sequence[str]], width: int) -> None:
        print(f"{header[0]:<38} " + " ".join(f"{h:>{width}}" for h in header[1:]))
        for cells in rows:
            print(f"  {cells[0]:<36} " + " ".join(f"{c:>{width}}" for c in cells[1:]))

    def row(label: str, bpb: float, note: str = "") -> None:
        print(f"  {label:<36} {bpb:>16.4f}" + (f"   ({note})" if note else ""))

    print(f"\n{ev.run['out_dir']} ({ev.run['checkpoint']}, step {ev.run['iter_num']}): "
          + " and ".join(f"{name} ({sp['likelihood']['tokens']:,} tokens)" for name, sp in splits.items()))
    table(("", *splits), side_by_side(splits), 16)
    if dyn := ev.dynamic:
        row(f"bpb, dynamic evaluation ({dynamic_label(dyn)})", dyn["bpb"], "chosen on val: " + ", ".join(
            f"{k} {v:.4f}" if v is not None else f"{k} diverged" for k, v in dyn["val_bpb_by_lr"].items()))
        if dyn.get("mixture"):
            row(f"bpb, dynamic evaluation and n-gram ({mixture_label(dyn['mixture'])})", dyn["mixture"]["bpb"])
    if mix := ev.mixture:
        row(f"bpb, mixed with an n-gram ({mixture_label(mix)})", mix["bpb"],
            "chosen on val: " + ", ".join(f"order {k} {v:.4f}" for k, v in mix["val_bpb_by_order"].items()))
    if ens := ev.ensemble:
        row(f"bpb, ensemble ({ensemble_label(ens)})", ens["bpb"], "runs alone: " + ", ".join(f"{b:.4f}" for b in ens["runs_bpb"]))
        if ens.get("mixture"):
            row(f"bpb, ensemble and n-gram ({mixture_label(ens['mixture'])})", ens["mixture"]["bpb"])
    if ev.baselines:
        print(f"baselines (bpb on {ev.data['split']}, fitted on train):")
        for k, v in sorted(ev.baselines.items(), key=lambda kv: kv[1]["bpb"]):
            verdict = "model better" if lk["bpb"] < v["bpb"] else "model worse"
            print(f"  {baseline_label(k):<36} {v['bpb']:.4f}  ({verdict} by {abs(lk['bpb'] - v['bpb']):.4f})")
    if ev.samples:
        print(f"at temperature {ev.sampling['temperature']:g} ({ev.sampling['source']}): {caps_line(ev.sampling)}")
        table(("memorisation", "generated", "real"), memo_rows(ev.memorisation), 10)
        if ts := ev.two_sample:
            print(f"two-sample test: skipped ({ts['skipped']})" if "skipped" in ts else
                  f"a classifier tells generated from real {ts['generated_vs_real'][HEADLINE]:.2f} of the time "
                  f"(real from real: {_acc(ts['real_vs_real'][HEADLINE])}; {HEADLINE}, {ts['pieces']} pieces of "
                  f"{ts['chars']} characters)")
        table(("style", "book", "generated", "real"), style_rows(ev.style) + theme_rows(ev.style["themes"]), 10)
    if (ov := ev.curves).get("evals"):
        print(f"val stopped improving at step {ov['best_iter']} ({ov['best_val_loss']:.4f}); "
              f"last eval step {ov['last_iter']}: {ov['last_val_loss']:.4f}")
    names = output_names(ev.settings["ckpt"], ev.settings["ensemble"])
    print(f"wrote {ev.run['out_dir']}/{names['json']} and {names['report']} in {ev.timings['total']:.1f} s")
