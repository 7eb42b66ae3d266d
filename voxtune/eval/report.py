"""The `voxtune eval` table: a report dict (`voxtune.eval.evaluate_suite`) as text."""

from __future__ import annotations

from typing import Any

from voxtune.eval.suite import SUMMARY_KEYS, Suite

__all__ = ["SUMMARY_KEYS", "format_table", "judge"]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def judge(report: dict[str, Any], suite: Suite) -> dict[str, bool | None]:
    """Each of the suite's targets: met (True), missed (False) or not measured (None)."""
    return {key: target.met(report.get(key)) for key, target in suite.targets.items()}


def format_table(report: dict[str, Any], suite: Suite | None = None) -> str:
    """The report as the table `voxtune eval` prints (targets marked when `suite` has them)."""
    lines = [
        f"suite {report['suite']} v{report['suite_version']} (sha256 {report['suite_sha256'][:12]}"
        + ("" if report.get("suite_matches_published", True) else ", differs from the published set")
        + (f", first {report['limit']} clips per group" if report.get("limit") else "")
        + ")",
        f"model {report.get('model') or '?'}, {report.get('date', '')}, voxtune {report.get('voxtune_version', '?')}",
        "",
        "transcription, held-out voices     CER      WER    clips",
    ]
    for lang, rates in report["cer_by_language"].items():
        lines.append(f"  {lang:<32} {_pct(rates.get('cer')):>6} {_pct(rates.get('wer')):>8} {rates.get('n', 0):>7}")
    lines.append(
        f"  {'all':<32} {_pct(report['cer_heldout_voices']):>6} {_pct(report['wer_heldout_voices']):>8} "
        f"{report['n_transcribed']:>7}"
    )
    mixed = report.get("cer_code_switched")
    if mixed:
        lines.append(
            f"  {'code-switched':<32} {_pct(mixed.get('cer')):>6} {_pct(mixed.get('wer')):>8} {mixed.get('n', 0):>7}"
        )
    lines += [
        "",
        f"language ID (clips of 2 s or more)  {_pct(report['lid_accuracy']):>6}  of {report['n_lid']}",
        f"  transcribed languages            {_pct(report['lid_accuracy_transcribed']):>6}",
        f"  identified-only languages        {_pct(report['lid_accuracy_identify_only']):>6}",
        f"code-switched: languages right     {_pct(report['segments_languages_accuracy']):>6}"
        f"  of {report['n_segments']},"
        f" boundary error {_num(report['segment_boundary_error_s'])} s",
        f"style                              {_pct(report['style_accuracy']):>6}  of {report['n_style']}",
        "  " + "  ".join(f"{s} {_pct(v)}" for s, v in report["style_accuracy_by_style"].items()),
        f"intent                             {_pct(report['intent_accuracy']):>6}  of {report['n_intent']}",
        f"instructions (exact answers)       {_pct(report['instruction_accuracy']):>6}  of {report['n_instructions']}",
        "  " + "  ".join(f"{k} {_pct(v)}" for k, v in report["instruction_accuracy_by_kind"].items()),
        "",
        f"CER by condition ({report['n_robustness']} clips)    "
        + "  ".join(f"{name} {_pct(value)}" for name, value in report["cer_by_condition"].items()),
        f"  CER at 10 dB over clean          {_num(report['cer_snr10_over_clean'])}x",
        f"real-time factor                   {_num(report['rtf'], 3)}  ({report.get('machine', 'this machine')})",
    ]
    if suite is not None and suite.targets:
        lines += ["", "targets"]
        for key, met in judge(report, suite).items():
            target = suite.targets[key]
            bound = f">= {target.min:g}" if target.min is not None else f"<= {target.max:g}"
            verdict = {True: "met", False: "MISSED", None: "not measured"}[met]
            lines.append(f"  {key:<28} {_num(report.get(key), 3):>7}  {bound:<8} {verdict}")
    return "\n".join(lines)
