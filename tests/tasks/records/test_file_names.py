"""Sample and line names as file names: letters of every script kept, only the unsafe replaced."""

import hashlib
import itertools
import random
import unicodedata

import pytest

from tasks.records.result_store import MAX_STEM_BYTES, ResultStore, safe_file_stem, unique_stems

ILLEGAL = set('<>:"|?*/\\')
WINDOWS_DEVICES = ["CON", "PRN", "AUX", "NUL"] + [f"{p}{n}" for p in ("COM", "LPT")
                                                  for n in range(1, 10)]


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("ünïcødé 名前", "ünïcødé 名前"),
        ("naïve part №1", "naïve part №1"),
        ("Ελληνικά-ملف_файл", "Ελληνικά-ملف_файл"),
        ("crack/003", "crack__003"),
        ("good\\up\\..\\..\\escape", "good__up__escape"),
        ("a<b>c:d\"e|f?g*h", "a_b_c_d_e_f_g_h"),
        ("tab\there\nnew\x00line\x7f", "tab_here_new_line_"),
        ("right\u202etxt.exe", "right_txt.exe"),
        ("ends with dots...", "ends with dots"),
        (".hidden", "hidden"),
        ("..", "sample"),
        (".", "sample"),
        ("", "sample"),
        ("con", "con_"),
        ("NUL.txt", "NUL_.txt"),
        ("lpt9", "lpt9_"),
        ("console", "console"),
        ("e\u0301t\u00e9", "\u00e9t\u00e9"),  # NFC: the decomposed é becomes the composed one
    ],
)
def test_known_names(name, stem):
    assert safe_file_stem(name) == stem


@pytest.mark.parametrize("device", WINDOWS_DEVICES)
def test_every_windows_device_name_is_changed_in_any_case_and_with_an_extension(device):
    for name in (device, device.lower(), f"{device}.npy", f"{device.title()}.tar.gz"):
        stem = safe_file_stem(name)
        assert stem.split(".")[0].upper() != device, name


def _random_names(count, seed):
    """Names drawn from letters of several scripts, digits, spaces, punctuation and the unsafe."""
    rng = random.Random(seed)
    alphabet = (
        "abcXYZ019 -_.()[]#%&+,;=@~'" + "äöüßéèçñ" + "αβγΩ" + "жЖщ" + "名前漢字" + "ملف" + "한글"
        + "".join(ILLEGAL) + "\x00\x01\x1f\x7f\x85\u2028\u202e"
    )
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(count)]


def _is_subsequence(needle, haystack):
    it = iter(haystack)
    return all(char in it for char in needle)


def test_random_names_give_safe_stems_that_keep_every_letter():
    for name in _random_names(500, seed=7):
        stem = safe_file_stem(name)
        assert stem and not stem.startswith(".")
        assert not stem.endswith((" ", ".")), (name, stem)
        assert not ILLEGAL & set(stem), (name, stem)
        assert all(unicodedata.category(c) not in ("Cc", "Zl") for c in stem), (name, stem)
        assert "\u202e" not in stem
        assert stem.split(".")[0].upper() not in WINDOWS_DEVICES
        letters = [c for c in unicodedata.normalize("NFC", name) if c.isalpha()]
        assert _is_subsequence(letters, stem), (name, stem)


def test_long_names_are_cut_at_a_character_boundary():
    stem = safe_file_stem("名" * 300)
    assert stem == "名" * (MAX_STEM_BYTES // 3)
    assert len(stem.encode("utf-8")) <= MAX_STEM_BYTES


def _suffix(name):
    return hashlib.sha256(name.encode("utf-8")).hexdigest()[:8]


def test_colliding_names_first_in_sorted_order_keeps_the_stem_the_others_get_their_digest():
    names = ["zz", "a__b", "a/b", "A__B", "a\\b"]
    stems = dict(zip(names, unique_stems(names), strict=True))
    # sorted: "A__B" < "a/b" < "a\\b" < "a__b"; the casefolded stems all read "a__b"
    assert stems == {
        "zz": "zz",
        "A__B": "A__B",
        "a/b": f"a__b_{_suffix('a/b')}",
        "a\\b": f"a__b_{_suffix('a' + chr(92) + 'b')}",
        "a__b": f"a__b_{_suffix('a__b')}",
    }


def test_collisions_do_not_depend_on_the_order_of_the_samples():
    names = ["x/y", "x__y", "X__Y", "ünï", "u\u0308nï", "solo", "a<b", "a>b"]
    expected = dict(zip(names, unique_stems(names), strict=True))
    assert len({s.casefold() for s in expected.values()}) == len(names)
    for order in itertools.islice(itertools.permutations(names), 0, None, 97):
        assert dict(zip(order, unique_stems(list(order)), strict=True)) == expected


def test_even_identical_names_get_distinct_files(tmp_path):
    stems = unique_stems(["same", "same", "same", "Same"])
    assert len({s.casefold() for s in stems}) == 4
    store = ResultStore(str(tmp_path))
    for stem in stems:
        store.write_text(f"maps/{stem}.txt", stem)
    written = sorted(p.name for p in (tmp_path / "maps").iterdir())
    assert written == sorted(f"{s}.txt" for s in stems)
