"""The interactive replay prompt understands only its documented answers
(issue 23, item 22): anything else is asked again, never taken for "discard"."""

from __future__ import annotations

import json
from collections.abc import Callable

from hypothesis import example, given
from hypothesis import strategies as st

from domain_event_broker import DomainEvent
from domain_event_broker._cli.prompt import ANSWERS, QUESTION, AnswerReader, InteractivePrompt
from domain_event_broker.replay import DISCARD, LEAVE, RETRY

BODY = json.dumps(DomainEvent("a.b", {"n": 1}).event_data).encode()


class ScriptedReader(AnswerReader):
    """Answers from a list, then the end of the input."""

    def __init__(self, answers: list[str | None]) -> None:
        super().__init__()
        self.answers = list(answers)
        self.asked = 0

    def read_line(self, timeout: float, keepalive: Callable[[], None] | None = None) -> str | None:
        self.asked += 1
        if not self.answers:
            self.at_end = True
            return ""
        return self.answers.pop(0)


def ask(*answers: str | None) -> tuple[str, str, ScriptedReader]:
    shown: list[str] = []
    reader = ScriptedReader(list(answers))
    prompt = InteractivePrompt(lambda text, end: shown.append(text + end), reader=reader)
    return prompt(body=BODY), "".join(shown), reader


def test_documented_answers_in_any_case() -> None:
    for text, action in [
        ("r", RETRY),
        ("R", RETRY),
        (" Replay ", RETRY),
        ("d", DISCARD),
        ("DISCARD", DISCARD),
        ("l", LEAVE),
        ("Leave", LEAVE),
        ("", LEAVE),
        (None, LEAVE),  # timed out
    ]:
        assert ask(text)[0] == action, text


def test_an_unknown_answer_is_asked_again() -> None:
    action, shown, reader = ask("don't", "dunno", "delete", "d")
    assert action == DISCARD
    assert reader.asked == 4
    assert shown.count(QUESTION) == 4
    assert shown.count("Unknown answer") == 3
    assert 'Unknown answer "don\'t": answer r (replay), d (discard) or l (leave)' in shown

    action, shown, reader = ask("dunno")  # then the input ends: the event stays
    assert action == LEAVE
    assert shown.endswith(f"{QUESTION}Message left in queue.\n")


@given(st.text(max_size=12))
@example("di\u017fcard")  # the long s: casefold() made it "discard" (found by the attack)
@example("DISCARD")
def test_no_answer_but_d_or_discard_discards(text: str) -> None:
    action, _, reader = ask(text, "")
    word = text.strip()
    understood = word.isascii() and word.lower() in ANSWERS
    expected = ANSWERS[word.lower()] if understood else LEAVE
    assert action == expected
    if action == DISCARD:
        assert word.lower() in {"d", "discard"} and word.isascii()
    # Understood at once, or asked again (then left by the empty answer).
    assert reader.asked == (1 if understood or not word else 2)
