"""Showing a streamed answer with its trust signals on a terminal."""

from __future__ import annotations

from typing import Any, TextIO

# ANSI styles; used only when writing to a terminal.
STRIKE_DIM = "\x1b[9;2m"
RESAMPLED = "\x1b[1;33m"
UNSTABLE = "\x1b[4m"
RESET = "\x1b[0m"


class TrustPrinter:
    """Streams tokens: a resampled token in bold yellow after its rejected draft struck through, a token
    with stability radius 0 (one vote flip could change it) underlined. Without colour: plain text."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color

    def token(self, event: Any) -> None:
        text = event.text
        if self.color and text:
            if event.resampled:
                draft = (event.draft_text or "").replace("\n", "\\n")
                text = f"{STRIKE_DIM}{draft}{RESET}{RESAMPLED}{text}{RESET}"
            elif event.stability_radius == 0:
                text = f"{UNSTABLE}{text}{RESET}"
        self.out.write(text)
        self.out.flush()

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()

    @staticmethod
    def summary(output: Any) -> str:
        s = output.settings
        mode = "greedy" if s["temperature"] == 0 else f"T={s['temperature']:g}"
        parts = [f"{output.mode}", f"seed {s['seed']}", mode]
        if output.mode == "poe":
            parts.append(f"draft head {output.draft_head}, {len(output.verifier_heads)} verifiers, gamma {s['gamma']}")
            if s["veto_threshold"] is not None:
                parts.append(f"veto {s['veto_threshold']:g}")
        n = len(output.token_ids)
        line = f"[{'; '.join(parts)}] {n} tokens in {output.elapsed_s:.2f} s"
        if output.tokens_per_second:
            line += f" ({output.tokens_per_second:.1f} tok/s)"
        if output.mode == "poe" and output.n_drafted:
            line += (
                f", acceptance {100 * output.acceptance_rate:.0f}% ({output.n_accepted}/{output.n_drafted}),"
                f" {len(output.resampled_idxs)} resampled, {output.tokens_per_round:.2f} tokens/round"
            )
        if output.stability_radii:
            line += f", min stability {min(output.stability_radii)}"
        if output.uncertainty is not None:
            line += f", p(correct) {output.uncertainty:.3f}"
        line += f", {output.verdict.upper() if output.abstained else output.verdict}"
        return line
