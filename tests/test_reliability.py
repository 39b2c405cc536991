"""Issue 16: one run per output folder, no hangs, no tracebacks, no leftovers (a test per finding).

Real mechanisms throughout: a second OS process holds the folder lock, disk-full is a real ENOSPC (from a tiny
tmpfs in a user namespace, or from /dev/full), Ctrl-C is a real SIGINT, a missing extra is a module that cannot
be imported.
"""

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from _toy import ToyGenerator
from _toy import flat
from _toy import private_data
from test_cli import SMALL

import pejax
from pejax import checkpoint as ckpt
from pejax import reporting
from pejax.cli import main
from pejax.config import PEConfig
from pejax.config import PrivacyConfig
from pejax.config import SpeedConfig
from pejax.runner import PrivateEvolution

SRC = pathlib.Path(pejax.__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]),
    "JAX_PLATFORMS": "cpu",
}
CLI = [sys.executable, "-m", "pejax.cli"]

PE = PEConfig(num_classes=3, samples_per_iteration=24, iterations=3, k=2, final_samples_per_class=6)


def toy_run(folder, key, **kw):
    x, y = private_data()
    runner = PrivateEvolution(
        generator=ToyGenerator(),
        embedding=flat,
        pe=PE,
        privacy=PrivacyConfig(epsilon=2.0, delta=1e-4),
        checkpoint_dir=folder,
        speed=SpeedConfig(retry_backoff_s=0.0),
    )
    return runner.run(jax.random.key(key), x, y, **kw)


def leftovers(*folders):
    """Temporary files and lock files left in ``folders``."""
    return sorted(
        p.name
        for f in folders
        if pathlib.Path(f).is_dir()
        for p in pathlib.Path(f).iterdir()
        if ".tmp-" in p.name or p.name == ".pejax.lock"
    )


def one_line_error(err: str, command: str = "run") -> str:
    """The single stderr line of a failed command (asserts there is no traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith(f"pejax {command}:")]
    assert len(lines) == 1, err
    return lines[0]


def write_config(tmp_path, text, name="c.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------------------
# 1. One run per output folder / checkpoint folder.


@pytest.mark.slow
def test_second_cli_run_on_one_out_folder_is_refused(tmp_path):
    """Issue: `pejax run` twice on one --out, 1 s apart: both exited 0 and one run's files were lost."""
    seeds = (3, 4)
    configs = [
        write_config(tmp_path, SMALL.replace("seed = 3", f"seed = {s}"), f"{s}.toml") for s in seeds
    ]
    out = tmp_path / "out"
    procs = []
    for config in configs:
        args = [*CLI, "run", str(config), "--out", str(out), "--no-progress"]
        procs.append(subprocess.Popen(args, env=ENV, text=True, stderr=subprocess.PIPE))
        time.sleep(1.0)
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], errs
    winner, loser = codes.index(0), codes.index(1)
    line = one_line_error(errs[loser])
    # Refused at the lock while the other run holds it (or, if it came too late, by the folder check).
    assert f"in use by another pejax run (process {procs[winner].pid} " in line or (
        "already holds another run's files" in line
    ), line
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["run"]["seed"] == seeds[winner] and report["resumed_from"] is None
    assert leftovers(out, out / "checkpoints") == []


HOLDER = """
import sys, time
from pejax.checkpoint import lock_folder
with lock_folder(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_checkpoint_folder_lock_refuses_a_live_run_and_recovers_a_killed_one(tmp_path):
    """A library checkpoint_dir is locked for the whole run; the lock of a kill -9'd process is recovered."""
    folder = tmp_path / "ckpt"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], env=ENV, text=True, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(
            RuntimeError, match=f"in use by another pejax run \\(process {holder.pid} "
        ):
            toy_run(folder, 0)
        assert not ckpt.list_checkpoints(folder)
    finally:
        holder.kill()  # SIGKILL: no cleanup runs in the holder
        holder.wait()
    assert (folder / ".pejax.lock").exists()  # the dead run's lock file is still there
    result = toy_run(folder, 0)
    assert [r.iteration for r in result.ledger.releases] == [0, 1, 2, 3]
    assert leftovers(folder) == []


ORPHAN = """
import os, sys, time
from pejax.checkpoint import lock_folder
lock = lock_folder(sys.argv[1])
lock.__enter__()
child = os.fork()
if child == 0:  # a worker forked by the run: it inherits the locked file and outlives the run
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    os.dup2(null, 2)
    time.sleep(600)
    os._exit(0)
print(child, flush=True)
os._exit(0)  # the run itself dies without releasing anything
"""


def test_lock_left_to_a_forked_child_of_a_dead_run_is_taken_over(tmp_path):
    """Stale-lock recovery by PID: the lock file names a dead process even though a fork still holds it."""
    folder = tmp_path / "ckpt"
    run = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", ORPHAN, str(folder)],
        env=ENV,
        text=True,
        capture_output=True,
        timeout=120,
    )
    child = int(run.stdout.strip())
    try:
        holder = json.loads((folder / ".pejax.lock").read_text())
        assert holder["pid"] != child
        with pytest.raises(ProcessLookupError):
            os.kill(holder["pid"], 0)
        result = toy_run(folder, 1)
        assert result.ledger.releases[-1].iteration == 3
        assert leftovers(folder) == []
    finally:
        os.kill(child, signal.SIGKILL)


def test_fresh_library_run_does_not_replace_another_runs_checkpoints(tmp_path):
    """`PrivateEvolution(checkpoint_dir=d).run(other_key)` without resume used to overwrite d's checkpoints."""
    toy_run(tmp_path, 0, stop_after=1)
    before = {p.name: p.read_bytes() for p in ckpt.list_checkpoints(tmp_path)}
    with pytest.raises(ValueError, match=r"holds ckpt-000000\.npz of another run"):
        toy_run(tmp_path, 1)
    assert {p.name: p.read_bytes() for p in ckpt.list_checkpoints(tmp_path)} == before
    # Resuming the run that owns the folder still works, and so does restarting that same run from scratch.
    assert toy_run(tmp_path, 0, resume=True).resumed_from == 1
    assert toy_run(tmp_path, 0).resumed_from is None


# ------------------------------------------------------------------------------------------------------------
# 2. Inputs that made dp-accounting hang or allocate terabytes.


@pytest.mark.parametrize(
    "argv,match",
    [
        (["account", "--epsilon", "1e9"], "epsilon=1e+09 is outside the range"),
        (["account", "--epsilon", "1e-9"], "epsilon=1e-09 is outside the range"),
        (["account", "--noise-multiplier", "1e-6"], "Use noise_multiplier >= 0.6325"),
        (
            ["account", "--noise-multiplier", "1", "--iterations", "1000000000"],
            "iterations=1000000000 is above 1000000",
        ),
        (["run", "epsilon = 1e-9"], "privacy.epsilon=1e-09 is outside the range"),
        (["run", "epsilon = 1e9"], "privacy.epsilon=1e+09 is outside the range"),
    ],
)
def test_accountant_inputs_are_bounded(tmp_path, argv, match):
    """Each used to run for minutes or fail with a MemoryError of hundreds of TiB; now a quick one-liner."""
    if argv[0] == "run":
        config = write_config(tmp_path, SMALL.replace("epsilon = 2.0", argv[1]))
        args = ["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]
    else:
        args = (
            argv + ["--delta", "1e-5"] + ([] if "--iterations" in argv else ["--iterations", "10"])
        )
    start = time.monotonic()
    proc = subprocess.run(CLI + args, env=ENV, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert match in one_line_error(proc.stderr, argv[0])
    assert time.monotonic() - start < 60
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# 3. Tracebacks and leftovers.


def _save(folder, iteration):
    return ckpt.save_checkpoint(folder, iteration, {"x": np.arange(1000.0)}, {"i": iteration})


def test_disk_full_checkpoint_write_leaves_no_temporary_file(tmp_path):
    """A real ENOSPC: the temporary file the writer opens is /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    _save(tmp_path, 1)
    tmp = tmp_path / f".ckpt-000002.npz.tmp-{os.getpid()}"
    tmp.symlink_to("/dev/full")
    with pytest.raises(
        OSError, match=r"could not write checkpoint .*ckpt-000002\.npz.*disk is full"
    ) as e:
        _save(tmp_path, 2)
    assert e.value.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000001.npz"]
    assert ckpt.load_checkpoint(tmp_path / "ckpt-000001.npz")[1] == {"i": 1}


def test_disk_full_synthetic_write_leaves_no_temporary_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    (tmp_path / f".synthetic.npz.tmp-{os.getpid()}").symlink_to("/dev/full")
    images, labels = np.zeros((4, 8, 8, 1), np.float32), np.arange(4)
    with pytest.raises(OSError, match=r"could not write synthetic data .*synthetic\.npz") as e:
        reporting.write_synthetic(tmp_path / "synthetic.npz", images, labels)
    assert e.value.errno == errno.ENOSPC and list(tmp_path.iterdir()) == []


def test_temporaries_of_a_killed_run_are_removed_on_resume(tmp_path):
    """A run killed in a write leaves `.NAME.tmp-PID`; the next run in the folder removes it."""
    toy_run(tmp_path, 0, stop_after=1)
    stale = [tmp_path / ".ckpt-000002.npz.tmp-999999", tmp_path / ".samples.png.tmp-999999.png"]
    for p in stale:
        p.write_bytes(b"half a file")
    toy_run(tmp_path, 0, resume=True)
    assert not any(p.exists() for p in stale) and leftovers(tmp_path) == []


def _namespace_works(tmp_path) -> bool:
    if shutil.which("unshare") is None or not hasattr(os, "fork"):
        return False
    probe = tmp_path / "probe"
    probe.mkdir()
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=4k tmpfs {probe}"],
        capture_output=True,
    )  # fmt: skip
    return proc.returncode == 0


def _in_namespace(tmp_path, script: str):
    """Runs a shell script as root of a new user and mount namespace (tmpfs mounts without real root)."""
    if not _namespace_works(tmp_path):
        pytest.skip("unprivileged user and mount namespaces are not available (unshare)")
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=ENV,
        text=True,
        capture_output=True,
        timeout=900,
    )


@pytest.mark.slow
def test_disk_full_in_a_real_run_is_one_line_and_resumable(tmp_path):
    """Disk full while writing a checkpoint, then while writing synthetic.npz, on real (tiny) tmpfs mounts."""
    config = write_config(tmp_path, SMALL)
    out = tmp_path / "out"
    run = " ".join([*CLI, "run", str(config), "--out", str(out), "--no-progress"])
    full = tmp_path / "full"
    script = textwrap.dedent(f"""
        mkdir -p {full} && mount -t tmpfs -o size=4k tmpfs {full}
        {run.replace(str(out), str(full / "out"))} 2>{tmp_path}/err0; echo "rc0=$?"; ls -A {full} > {tmp_path}/ls0
        mkdir -p {out} && mount -t tmpfs -o size=8k tmpfs {out}
        mkdir {out}/checkpoints && mount -t tmpfs -o size=4k tmpfs {out}/checkpoints
        {run} 2>{tmp_path}/err1; echo "rc1=$?"; ls -A {out} {out}/checkpoints > {tmp_path}/ls1
        mount -o remount,size=64m tmpfs {out}/checkpoints
        {run} --resume 2>{tmp_path}/err2; echo "rc2=$?"; ls -A {out} {out}/checkpoints > {tmp_path}/ls2
        mount -o remount,size=64m tmpfs {out}
        {run} --resume 2>{tmp_path}/err3; echo "rc3=$?"; ls -A {out} {out}/checkpoints > {tmp_path}/ls3
    """)
    proc = _in_namespace(tmp_path, script)
    assert "rc1=1" in proc.stdout and "rc2=1" in proc.stdout and "rc3=0" in proc.stdout, (
        proc.stdout + proc.stderr
    )
    # 0: not even the checkpoint folder's lock file fits; the folders this run created are removed again.
    assert "rc0=1" in proc.stdout
    line = one_line_error((tmp_path / "err0").read_text())
    assert "could not write the lock file" in line and "No space left on device" in line
    assert (tmp_path / "ls0").read_text() == ""
    # 1: the first checkpoint does not fit.
    line = one_line_error((tmp_path / "err1").read_text())
    assert "could not write checkpoint" in line and "ckpt-000000.npz" in line
    assert "the disk is full" in line and "resume with --resume" in line
    # 2: every checkpoint fits now, synthetic.npz does not.
    line = one_line_error((tmp_path / "err2").read_text())
    assert "could not write synthetic data" in line and "synthetic.npz" in line
    # 3: room again: the resumed run writes every output, and no temporary or lock file is left anywhere.
    for i in (1, 2, 3):
        listing = (tmp_path / f"ls{i}").read_text()
        assert ".tmp-" not in listing and ".pejax.lock" not in listing, listing
    assert "report.json" in (tmp_path / "ls3").read_text()


@pytest.mark.slow
def test_read_only_output_folder_is_one_line(tmp_path):
    config = write_config(tmp_path, SMALL)
    ro = tmp_path / "ro"
    script = textwrap.dedent(f"""
        mkdir -p {ro} && mount -t tmpfs -o ro,size=64k tmpfs {ro}
        {" ".join(CLI)} run {config} --out {ro}/out --no-progress; echo "rc=$?"
    """)
    proc = _in_namespace(tmp_path, script)
    assert "rc=1" in proc.stdout
    assert "Read-only file system" in one_line_error(proc.stderr)


def test_output_path_below_a_file_is_one_line(tmp_path, capsys):
    config = write_config(tmp_path, SMALL)
    (tmp_path / "file").write_text("x")
    assert main(["run", str(config), "--out", str(tmp_path / "file" / "out"), "--no-progress"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "Not a directory" in line and "file/out" in line


def test_zero_byte_data_file_is_one_line(tmp_path, capsys):
    (tmp_path / "empty.npz").write_bytes(b"")
    text = SMALL.replace('source = "digits"', f'source = "npz"\npath = "{tmp_path / "empty.npz"}"')
    config = write_config(tmp_path, text)
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "empty.npz" in line and "could not be read as an .npz archive" in line


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_leaves_nothing_behind(tmp_path):
    # Enough iterations that the interrupt lands mid-run (a warm 2-iteration run can finish within one poll).
    config = write_config(tmp_path, SMALL.replace("iterations = 2", "iterations = 12"))
    out = tmp_path / "out"
    args = [*CLI, "run", str(config), "--out", str(out), "--no-progress"]
    proc = subprocess.Popen(
        args,
        env=ENV,
        text=True,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        # A suite started in the background (`cmd &` in a script) passes SIGINT on as ignored, and Python then
        # keeps ignoring it: restore the default so the child gets Ctrl-C as a user's terminal would send it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 300
    while not ckpt.list_checkpoints(out / "checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert one_line_error(err) == "pejax run: interrupted; resume with --resume."
    assert leftovers(out, out / "checkpoints") == []
    resumed = subprocess.run(
        [*args, "--resume"], env=ENV, text=True, capture_output=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "report.json").read_text())["resumed_from"] is not None


def test_audit_without_its_extra_names_the_extra():
    code = (
        "import sys; sys.modules['jax_privacy'] = None\n"  # jax-privacy is not installed
        "from pejax.cli import main\n"
        "sys.exit(main(['audit', '--noise-multiplier', '3', '--runs', '200']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=ENV, text=True, capture_output=True, timeout=300
    )
    assert proc.returncode == 1
    line = one_line_error(proc.stderr, "audit")
    assert "'audit' extra" in line and "pip install 'pejax[audit]'" in line


# ------------------------------------------------------------------------------------------------------------
# 4. Unclear messages.


@pytest.mark.parametrize(
    "argv,match",
    [
        (["account", "--epsilon", "1", "--delta", "1e-300"], "delta=1e-300 is below 1e-12"),
        (
            ["account", "--noise-multiplier", "-1", "--delta", "1e-5"],
            "noise_multiplier must be >= 0",
        ),
    ],
)
def test_account_messages(argv, match, capsys):
    assert main([*argv, "--iterations", "10"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing printed before the error
    assert match in one_line_error(captured.err, "account")


@pytest.mark.parametrize(
    "text,match",
    [
        ("", "config section [pe] needs pe.num_classes"),
        (SMALL.replace("epsilon = 2.0", "epsilon = 2.0\ndelta = 1e-300"), "privacy.delta=1e-300"),
        (SMALL.replace("degrees = [0.5, 0.2]", 'degrees = "0.5"'), "pe.degrees must be a list"),
        (SMALL.replace("degrees = [0.5, 0.2]", "degrees = 0.5"), "pe.degrees must be a list"),
        (
            SMALL.replace("image_size = 16", 'image_size = 16\nfonts = [["a.ttf"]]'),
            "generator.fonts[0] must be a path",
        ),
        (SMALL.replace('source = "digits"', 'source = "npz"\npath = ["a.npz"]'), "data.path must"),
    ],
)
def test_config_messages_name_the_key(tmp_path, text, match, capsys):
    config = write_config(tmp_path, text)
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 1
    assert match in one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_binary_config_file_is_named(tmp_path, capsys):
    config = tmp_path / "binary.toml"
    config.write_bytes(bytes(range(256)))
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "binary.toml" in line and "not UTF-8 text" in line


@pytest.mark.slow
def test_test_images_of_another_size_are_resized_and_said_so(tmp_path, capsys):
    from pejax.data import load_digits_split

    d = load_digits_split()
    np.savez(tmp_path / "train.npz", images=d.train_images, labels=d.train_labels)
    big = np.repeat(np.repeat(d.test_images, 2, axis=1), 2, axis=2)  # 16 x 16
    np.savez(tmp_path / "test.npz", images=big, labels=d.test_labels)
    data = (
        f'source = "npz"\npath = "{tmp_path / "train.npz"}"\ntest_path = "{tmp_path / "test.npz"}"'
    )
    config = write_config(
        tmp_path,
        SMALL.replace('source = "digits"', data).replace("iterations = 2", "iterations = 1"),
    )
    assert main(["run", str(config), "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "note: the test images are 16x16 and the training images 8x8" in out
    assert "test images are resized" in out
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert 0.0 <= report["final_metrics"]["test_accuracy"] <= 1.0
