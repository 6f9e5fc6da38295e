"""Property tests of ``talk2dino segment``'s output names (issue 14).

For any set of input file names (``a.png`` beside ``a_labels.png`` and ``a.json``, names near the 255-byte limit,
multi-byte and odd Unicode, hidden names that look like our temp files) and any output options:

- the planned output names are unique, fit the file-name limit in bytes, and are never an input's name unless
  the run is refused before it starts;
- a real run in place (``segment DIR --out DIR``) never changes or removes an input, leaves no temp file, and
  its JSONs list distinct files that exist; a refused run (exit 2) writes nothing;
- special files (a FIFO among the inputs, a folder where an output goes) fail cleanly and never block.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from conftest import deadline, write_noise_image  # noqa: E402

from talk2dino.cli.output_folder import max_stem_bytes, output_names, plan_stems, refuse_overwrites  # noqa: E402
from talk2dino.errors import InvalidInputError  # noqa: E402
from talk2dino.fileio import NAME_MAX_DEFAULT, is_temp_name, name_bytes  # noqa: E402

TRICKY = ["a.png", "a_labels.png", "a.json", "a_overlay.png", "a_legend.png", "a.jpg", "a_1.png", "a_labels.json",
          "A.png", "a.PNG", "a.tar.png", "a_scores.npz", ".a.0123456789ab.tmp.png", ".t2d-0123456789ab.tmp.png",
          ".a_labels.0123456789ab.tmp.png", ".hidden.png", "a~12345678.png", "con.png", " a.png", "a .png",
          "-a.png", "a\nb.png", "ａ.png", "a\u0301.png", "á.png"]
EXTENSIONS = [".png", ".jpg", ".PNG", ".json", ".jpeg", ""]


def _fits(name: str) -> bool:
    return name not in ("", ".", "..") and name_bytes(name) <= NAME_MAX_DEFAULT


odd_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                   max_size=30)
long_name = st.builds(lambda char, size, ext: char * (size // name_bytes(char)) + ext,
                      st.sampled_from(["x", "é", "名", "😀"]), st.integers(200, 251), st.sampled_from(EXTENSIONS))
names = st.one_of(st.sampled_from(TRICKY), long_name,
                  st.builds(lambda text, ext: text + ext, odd_text, st.sampled_from(EXTENSIONS))).filter(_fits)
options = st.fixed_dictionaries({"overlay": st.booleans(), "save_scores": st.booleans(),
                                 "save_heatmaps": st.booleans(), "save_attention": st.booleans()})


@settings(max_examples=300, deadline=None)
@given(inside=st.lists(names, min_size=1, max_size=8, unique=True),
       elsewhere=st.lists(names, max_size=4, unique=True), opts=options, overwrite=st.booleans())
def test_planned_outputs_are_unique_fit_and_spare_inputs(inside: list[str], elsewhere: list[str],
                                                         opts: dict[str, bool], overwrite: bool) -> None:
    with tempfile.TemporaryDirectory() as root:
        out = Path(root) / "out"
        other = Path(root) / "other"
        out.mkdir()
        other.mkdir()
        paths = [out / name for name in inside] + [other / name for name in elsewhere]
        for path in paths:
            path.write_bytes(b"x")
        stems = plan_stems(paths, stem_bytes=max_stem_bytes(out))
        assert len(set(stems.values())) == len(paths)
        targets = [name for stem in stems.values() for name in output_names(stem, **opts)]
        assert len(set(targets)) == len(targets)
        assert all(name_bytes(name) <= NAME_MAX_DEFAULT for name in targets)
        try:
            refuse_overwrites(out, targets, paths, overwrite=overwrite, ours=set())
        except InvalidInputError as err:
            assert "\n" not in str(err)
            return
        assert not set(targets) & set(inside)


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Name -> content of every entry in `folder` (None for anything but a regular file: a FIFO is not read)."""
    return {p.name: p.read_bytes() if p.is_file() and not p.is_symlink() else None for p in folder.iterdir()}


def _is_our_temp_naming(name: str) -> bool:
    """A name talk2dino treats as its own temp file (`cli.output_folder.remove_stale_temps` may delete it as stale)."""
    from talk2dino.fileio import temp_target

    target = temp_target(name)
    kinds = tuple(output_names("", overlay=True, save_scores=True, save_heatmaps=True, save_attention=True))
    return target.endswith(kinds) if target is not None else is_temp_name(name)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(files=st.lists(names, min_size=1, max_size=4, unique=True), fifo=st.booleans(),
       folder_target=st.booleans(), overwrite=st.booleans(), explicit=st.booleans())
@example(files=["a.png", "b" * 250 + ".png"], fifo=True, folder_target=False, overwrite=False, explicit=True)
@example(files=["a.png", "a_labels.png"], fifo=False, folder_target=False, overwrite=True, explicit=False)
@example(files=["a.png", ".t2d-0123456789ab.tmp.png"], fifo=False, folder_target=False, overwrite=False,
         explicit=True)
def test_segment_in_place_never_touches_inputs(tiny_model: object, tmp_path_factory: pytest.TempPathFactory,
                                               files: list[str], fifo: bool, folder_target: bool,
                                               overwrite: bool, explicit: bool) -> None:
    import json

    from talk2dino.cli import main
    from talk2dino.data.image_lists import list_images

    folder = tmp_path_factory.mktemp("inplace")
    for index, name in enumerate(files):
        if name.lower().endswith((".png", ".jpg", ".jpeg")):
            # Written under a plain name, then renamed: PIL takes the format from os.path.splitext, which finds
            # no extension in a name such as "..png" (hypothesis generates those).
            staged = write_noise_image(folder / f".staged{Path(name).suffix.lower()}", h=20, w=30, seed=index)
            staged.rename(folder / name)
        elif name.lower().endswith(".json"):
            (folder / name).write_text('{"mine": true}\n')
        else:
            (folder / name).write_bytes(b"not an image")
    if fifo and hasattr(os, "mkfifo"):
        # Never opened for reading: a folder scan skips it, given by name it fails alone, and as a *.json in
        # --out it is no summary.
        os.mkfifo(folder / "pipe.png")
        os.mkfifo(folder / "other.json")
    if folder_target and not (folder / "a_legend.png").exists():
        (folder / "a_legend.png").mkdir()
    entries = sorted(p.name for p in folder.iterdir() if not p.is_dir())
    arguments = [str(folder / name) for name in entries] if explicit else [str(folder)]
    inputs = {p.name for p in list_images(arguments)}
    before = _snapshot(folder)
    argv = ["segment", *arguments, "--labels", "cat,dog", "--no-pamr", "--no-progress", "-q", "--out", str(folder),
            *(["--overwrite"] if overwrite else [])]
    with pytest.MonkeyPatch.context() as patch, deadline(120):
        patch.setattr("talk2dino.cli.model_flags.create_model_from_args", lambda args: tiny_model)
        code = main(argv)
    after = _snapshot(folder)
    assert code in (0, 1, 2)
    event(f"exit {code}")
    for name, content in before.items():
        if name in inputs:  # an input is never changed or removed, even with --overwrite
            assert after.get(name, b"gone") == content, name
        elif _is_our_temp_naming(name):  # named as our own temp files: may be removed as stale
            assert after.get(name, content) == content, name
        elif not overwrite:  # anything else only with --overwrite
            assert after.get(name, b"gone") == content, name
    if code == 2:  # refused before it started: nothing written, nothing removed but our temp naming
        assert set(after) <= set(before)
        return
    new = set(after) - set(before)
    summaries = [name for name in after if name.endswith(".json") and after[name] is not None
                 and name not in before or (overwrite and name in before and name not in inputs
                                            and name.endswith(".json") and after[name] != before[name])]
    listed: list[str] = []
    for name in summaries:
        listed.extend(json.loads(after[name] or b"{}")["files"].values())
    # Every output name is unique and exists; nothing else is left behind (no temp file).
    assert len(listed) == len(set(listed)) and set(listed) <= set(after)
    assert new <= set(listed) | set(summaries)
    assert all(name_bytes(name) <= NAME_MAX_DEFAULT for name in new)
