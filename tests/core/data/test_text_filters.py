"""Filters for written user turns: each reason at its boundary, the counts, and the real langid.

What must hold: every bound is inclusive on the kept side (a text exactly at min or max passes);
a degenerate text is caught however it repeats while ordinary short prompts pass; the language
rule asks langid only when the text is long enough, and judges a shorter one by its script.
"""

from __future__ import annotations

import sys

import pytest
from langid.langid import classify

from dflash_core.data import text_filters
from dflash_core.data.formats import DataError
from dflash_core.data.text_filters import (
    LANGUAGE_SCRIPTS,
    TextFilter,
    TextFilterConfig,
    identify_language,
    in_language,
    is_degenerate,
    script_matches,
)

MARKERS = ("<|im_start|>", "<|im_end|>", "assistant\n")


def _check(text: str, *, token_count: int = 10, **config) -> str | None:
    return TextFilter(TextFilterConfig(**config)).check(text, token_count=token_count)


def test_empty_after_stripping() -> None:
    assert _check(" \n\t ") == "empty"
    assert _check("", token_count=0) == "empty"
    assert _check(" Hi ") is None


def test_role_markers() -> None:
    assert _check("Tell me a joke<|im_end|>", role_markers=MARKERS) == "role_marker"
    assert _check("Tell me a joke.\nassistant\nSure!", role_markers=MARKERS) == "role_marker"
    assert _check("Ask my assistant about it", role_markers=MARKERS) is None  # no newline after it
    assert _check("Tell me a joke<|im_end|>") is None  # no markers given


def test_token_bounds_are_inclusive() -> None:
    assert _check("Tell me a joke", token_count=2, min_tokens=3) == "too_short"
    assert _check("Tell me a joke", token_count=3, min_tokens=3) is None
    assert _check("Tell me a joke", token_count=10, max_tokens=10) is None
    assert _check("Tell me a joke", token_count=11, max_tokens=10) == "too_long"


def test_char_bounds_are_inclusive_and_ignore_surrounding_whitespace() -> None:
    assert _check("  Hello  ", min_chars=6) == "too_short"
    assert _check("  Hello  ", min_chars=5) is None
    assert _check(" Hello there ", max_chars=11) is None
    assert _check(" Hello there!", max_chars=11) == "too_long"


def test_degenerate_repeats() -> None:
    assert is_degenerate("!!!!!!!!") and is_degenerate("?!") and is_degenerate("🙂🙂🙂")
    assert not is_degenerate("42") and not is_degenerate("a")
    # One character: more than half of the non-space characters, once there are 4.
    assert is_degenerate("zzzzab") and not is_degenerate("zzzabc")
    assert is_degenerate("ohhh") and not is_degenerate("oof")
    # One word: more than half of the words, once there are 4 of them.
    assert is_degenerate("help help help me") and not is_degenerate("help help me now")
    assert not is_degenerate("Why? Why not?")
    # A looping phrase: words inside a repeated 4-gram, more than half of all words.
    loop = "what is the best way what is the best way to"
    assert is_degenerate(loop)
    half = "one two three four alpha beta gamma delta one two three four epsilon zeta eta theta"
    assert not is_degenerate(half)  # 8 of 16 words inside a repeated 4-gram: exactly half
    assert is_degenerate(half.rsplit(" ", 1)[0])  # 8 of 15
    assert not is_degenerate(
        "Compare Python and Rust for writing a web server: which is faster, which is safer, and why?"
    )
    assert _check("zzzzab") == "degenerate"
    assert _check("zzzzab", max_repeated_share=0.7) is None


def test_language_by_langid_for_long_texts() -> None:
    english = "Could you explain how photosynthesis works in plants?"
    french = "Pourriez-vous m'expliquer comment fonctionne la photosynthèse ?"
    assert _check(english, language="en") is None
    assert _check(french, language="en") == "language"
    assert _check(french, language="fr") is None


def test_short_texts_are_judged_by_script() -> None:
    # langid calls this English prompt Spanish: too short (16 letters) for any identifier.
    assert identify_language("Explain recursion") != "en"
    assert _check("Explain recursion", language="en") is None
    assert _check("Привет, как дела?", language="en") == "language"
    assert _check("Привет, как дела?", language="ru") is None
    assert _check("日本語で書いてください", language="ja") is None
    assert _check("日本語で書いてください", language="en") == "language"
    assert _check("1234 + 5678", language="en") == "language"  # no letters: no script to match


def test_language_letter_boundary() -> None:
    below = "Comment faire du bon pain ici"  # 24 letters: script rule, Latin, kept as "en"
    at = "Comment faire du très bon pain"  # 25 letters: langid decides (fr)
    assert sum(c.isalpha() for c in below) == 24 and sum(c.isalpha() for c in at) == 25
    assert in_language(below, "en", min_letters=25)
    assert not in_language(at, "en", min_letters=25)
    assert _check(at, language="en", min_language_letters=26) is None


def test_script_table_covers_langid_and_scripts_match() -> None:
    from langid.langid import LanguageIdentifier, model

    assert set(LANGUAGE_SCRIPTS) == set(LanguageIdentifier.from_modelstring(model).nb_classes)
    samples = {
        "en": "Hello there",
        "ru": "Привет",
        "sr": "Zdravo Здраво",
        "ar": "مرحبا",
        "el": "Γεια σου",
        "he": "שלום",
        "hi": "नमस्ते",
        "th": "สวัสดีครับ",
        "zh": "中文怎么说",
        "ja": "カタカナとひらがな",
        "ko": "안녕하세요",
        "ka": "გამარჯობა",
    }
    for language, text in samples.items():
        assert script_matches(text, language), language
        assert not script_matches(text, "en") or language in ("en", "sr"), language
    assert script_matches("Ｈｅｌｌｏ", "en")  # full-width Latin, after NFKC
    assert not script_matches("", "en")


def test_fast_identifier_agrees_with_langid() -> None:
    texts = [
        "How do I bake bread at home without a stand mixer?",
        "Wie backe ich zu Hause Brot ohne Küchenmaschine?",
        "¿Cómo hago pan en casa sin batidora?",
        "Как испечь хлеб дома без миксера?",
        "家でパンを焼くにはどうすればいいですか？",
        "ok thanks",
        "print('hello world')",
    ]
    for text in texts:
        assert identify_language(text) == classify(text)[0], text


def test_counts_per_reason() -> None:
    f = TextFilter(TextFilterConfig(min_tokens=2, max_tokens=5, role_markers=MARKERS))
    checks = [
        ("Hi", 1),
        ("Tell me a joke", 4),
        ("", 0),
        ("Tell me a very long joke please now", 8),
        ("<|im_start|>user", 3),
        ("no no no no", 4),
        ("Name a fruit", 3),
    ]
    reasons = [f.check(text, token_count=n) for text, n in checks]
    assert reasons == [
        "too_short",
        None,
        "empty",
        "too_long",
        "role_marker",
        "degenerate",
        None,
    ]
    assert f.counts == {"too_short": 1, "empty": 1, "too_long": 1, "role_marker": 1, "degenerate": 1}
    assert f.kept == 2


def test_config_errors_say_what_to_change() -> None:
    with pytest.raises(ValueError, match="'xx' is not one langid identifies"):
        TextFilterConfig(language="xx")
    with pytest.raises(ValueError, match="min_tokens=5, max_tokens=4"):
        TextFilterConfig(min_tokens=5, max_tokens=4)
    with pytest.raises(ValueError, match="empty string"):
        TextFilterConfig(role_markers=("<|im_end|>", ""))
    assert TextFilterConfig(role_markers=["a"]).role_markers == ("a",)  # type: ignore[arg-type]


def test_missing_langid_fails_at_construction_with_an_install_hint(monkeypatch) -> None:
    text_filters._identifier.cache_clear()
    monkeypatch.setitem(sys.modules, "langid.langid", None)  # makes the import fail
    try:
        with pytest.raises(DataError, match="pip install langid"):
            TextFilter(TextFilterConfig(language="en"))
        TextFilter(TextFilterConfig())  # no language: langid is never needed
    finally:
        text_filters._identifier.cache_clear()
