"""The loopback Hub emulator (tests/support/hub_emulator.py), checked against the official
huggingface_hub client, and dreambridge checked against both:

1. huggingface_hub uploads a pipeline (create_repo + upload_folder, LFS path) and downloads it
   back with snapshot_download: bytes identical (the emulator speaks the client's protocol);
2. dreambridge downloads what huggingface_hub uploaded: identical bytes, into a cache that
   huggingface_hub reads offline (scan_cache_dir, snapshot_download with HF_HUB_OFFLINE);
3. dreambridge pushes; huggingface_hub's snapshot_download gets identical bytes.

    parity/.venv-torch/bin/python parity/hub_fidelity.py target/release/dreambridge
"""
import filecmp
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import WORK, record_fact  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN = "hf_fidelity_token"


def same_tree(a, b):
    """Every file of a is in b with the same bytes (b may hold more, e.g. .gitattributes)."""
    for root, _, files in os.walk(a):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), a)
            if not filecmp.cmp(os.path.join(a, rel), os.path.join(b, rel), shallow=False):
                return False, rel
    return True, None


def main(db):
    emu = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/support/hub_emulator.py"), "--token", TOKEN,
                            "--part-size", str(256 * 1024)], stdout=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{emu.stdout.readline().strip()}"
    tmp = tempfile.mkdtemp(dir=WORK)
    env = dict(os.environ, HF_ENDPOINT=url, HF_TOKEN=TOKEN, HF_HUB_DISABLE_XET="1", HF_HOME=os.path.join(tmp, "py_home"))
    os.environ.update(env)
    try:
        from huggingface_hub import HfApi, scan_cache_dir, snapshot_download
        import huggingface_hub

        pipe = os.path.join(tmp, "pipe")
        subprocess.run([db, "convert", "keras-to-diffusers", "--out", pipe], check=True, capture_output=True)
        api = HfApi(endpoint=url, token=TOKEN)
        api.create_repo("me/py-up")
        api.upload_folder(repo_id="me/py-up", folder_path=pipe, commit_message="from huggingface_hub")
        got = snapshot_download("me/py-up", cache_dir=os.path.join(tmp, "py_cache"))
        ok, bad = same_tree(pipe, got)
        record_fact("hub emulator fidelity", f"hf_hub {huggingface_hub.__version__} up+down", ok, "official client round trip" if ok else f"differs: {bad}")

        db_home = os.path.join(tmp, "db_home")
        out = subprocess.run([db, "download", "me/py-up"], env=dict(env, HF_HOME=db_home), capture_output=True, text=True)
        ok, bad = (out.returncode == 0, out.stderr[-300:]) if out.returncode else same_tree(pipe, out.stdout.strip())
        record_fact("hub emulator fidelity", "hf_hub up, dreambridge down", ok, "identical bytes" if ok else f"{bad}")
        cache = os.path.join(db_home, "hub")
        repos = {r.repo_id for r in scan_cache_dir(cache).repos}
        offline = snapshot_download("me/py-up", cache_dir=cache, local_files_only=True)
        ok, bad = same_tree(pipe, offline)
        record_fact("hub emulator fidelity", "dreambridge cache, hf_hub offline", ok and "me/py-up" in repos,
                    "scan_cache_dir + local_files_only read it" if ok else f"{bad}")

        out = subprocess.run([db, "push", pipe, "--repo", "me/rs-up"], env=env, capture_output=True, text=True)
        got = snapshot_download("me/rs-up", cache_dir=os.path.join(tmp, "py_cache2")) if out.returncode == 0 else None
        ok, bad = same_tree(pipe, got) if got else (False, out.stderr[-300:])
        record_fact("hub emulator fidelity", "dreambridge up, hf_hub down", ok, "identical bytes" if ok else f"{bad}")
    finally:
        emu.kill()


if __name__ == "__main__":
    main(os.path.abspath(sys.argv[1]))
