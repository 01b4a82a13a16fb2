"""Symlinks planted in the output tree lead no write outside it (issue 13, item 11).

Before any harvest, someone with access to ``output.dir`` plants links where harvester will
write: a job folder pointing at another folder that holds a ``MANIFEST.json`` and what looks
like a leftover temporary file, a job's ``labels/`` pointing at a folder outside, a final
file name pointing at a file outside, the provider folder's sibling job folder pointing at a
folder inside. Harvester used to follow them: the outside ``MANIFEST.json`` was deleted and
rewritten, the "temporary" file swept away, every ``.npy`` written outside.

Now: everything outside is byte for byte as it was, every job is harvested into real folders
inside ``output.dir`` with arrays equal to the ground truth, no symlink is left in a job
folder, and ``status --check`` passes.
"""

from __future__ import annotations

from pathlib import Path

from tests.badinput.helpers import tree_digest

from .harness import (
    EmulatorThread,
    case,
    check_final,
    scenario,
)


def test_planted_symlinks_lead_no_write_outside_output_dir(tmp_path: Path) -> None:
    project = "sym"
    outside = tmp_path / "outside"
    victim = outside / "victim-job"
    victim.mkdir(parents=True)
    (victim / "MANIFEST.json").write_text('{"precious": true}')
    (victim / ".job.json.tmp-0000beef").write_text("not harvester's")
    (victim / "job.json").write_text("someone else's job.json")
    labels_elsewhere = outside / "labels"
    labels_elsewhere.mkdir()
    (outside / "precious.txt").write_text("do not touch")
    before = tree_digest(outside)

    with EmulatorThread(scenario()) as emu:
        c = case(tmp_path / "cfg", emu.urls, project, playment=4, others=0,
                 providers=("playment",), jobs_file=tmp_path / "jobs.jsonl")  # fmt: skip
        out = tmp_path / "cfg" / "out" / "playment"
        out.mkdir(parents=True)
        (out / "sym-p00").symlink_to(victim)  # the whole job folder
        (out / "sym-p01").mkdir()
        (out / "sym-p01" / "labels").symlink_to(labels_elsewhere)  # labels/ only
        (out / "sym-p02").mkdir()
        (out / "sym-p02" / "result.json").symlink_to(outside / "precious.txt")  # a final name
        (out / "sym-p02" / "MANIFEST.json").symlink_to(outside / "precious.txt")
        (out / "elsewhere").mkdir()
        (out / "sym-p03").symlink_to(out / "elsewhere")  # a folder inside, still a link
        run = c.harvest()
        assert run.returncode == 0, run.tail()
        assert tree_digest(outside) == before
        assert list(labels_elsewhere.iterdir()) == []
        for n in range(4):
            folder = out / f"sym-p{n:02d}"
            assert not folder.is_symlink()
            links = [p for p in folder.rglob("*") if p.is_symlink()]
            assert links == [], links
            assert (folder / "MANIFEST.json").is_file()
        assert list((out / "elsewhere").iterdir()) == []
        check_final(c.config, emu, c.lines, crashed=False)  # ground truth and status --check
