"""The Dockerfile's two images, really built (podman, from a base made of Debian's packages by
scripts/images/build.sh) and run: as their non-root user, with a read-only root file system;
the operator image without torch; one tiny trainer stage inside the trainer image against the
local S3 endpoint."""
from __future__ import annotations

import json
import subprocess

import pytest

from tests.cluster.images import OPERATOR, TRAINER, podman_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def images(built_images):
    print("\nimage sizes:", built_images)
    return built_images


def podman_run(image: str, *argv: str, env: dict[str, str] | None = None, timeout: float = 300,
               user: str | None = "10001:10001") -> subprocess.CompletedProcess:
    cmd = ["podman", "run", "--rm", "--read-only", "--network", "host"]
    if user:
        cmd += ["--user", user]
    for k, v in (env or {}).items():
        cmd += ["-e", f"{k}={v}"]
    return subprocess.run(cmd + [image, *argv], env=podman_env(), capture_output=True, text=True, timeout=timeout)


def test_both_images_run_their_commands_as_the_non_root_user_on_a_read_only_root(images):
    for image, commands in ((OPERATOR, (["ratatouille", "--help"],)),
                            (TRAINER, (["ratatouille", "--help"], ["ratatouille-trainer", "--help"]))):
        whoami = podman_run(image, "id", "-u", user=None)  # the image's own USER
        assert whoami.returncode == 0 and whoami.stdout.strip() == "10001", whoami.stderr
        for argv in commands:
            proc = podman_run(image, *argv)
            assert proc.returncode == 0 and "usage:" in proc.stdout, (image, argv, proc.stderr)
        # the root file system is read-only: only /tmp (the pod's emptyDir) is writable
        proc = podman_run(image, "sh", "-c", "touch /opt/x 2>/dev/null && echo writable || echo read-only")
        assert proc.stdout.strip() == "read-only"


def test_the_operator_image_has_no_torch_and_the_trainer_image_has_cuda_torch(images):
    proc = podman_run(OPERATOR, "python3", "-c", "import torch")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    proc = podman_run(TRAINER, "python3", "-c", "import torch; print(torch.__version__, torch.version.cuda)")
    assert proc.returncode == 0 and proc.stdout.startswith("2.14.1") and proc.stdout.split()[1] != "None", proc


def test_a_trainer_stage_runs_inside_the_trainer_image_against_local_s3(images, moto_server, s3_bucket, tmp_path):
    import boto3

    from tests.trainer.util import job, write_dataset

    data = write_dataset(tmp_path / "data", per_class=3)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    for path in sorted(data.rglob("*")):
        if path.is_file():
            s3.upload_file(str(path), bucket, f"data/{path.relative_to(data).as_posix()}")
    desc = job("linear-probe", f"{s3_bucket}/out/linear-probe", f"{s3_bucket}/data", steps=3)
    desc["storage"] = {"endpoint": moto_server}
    proc = podman_run(TRAINER, "ratatouille-trainer", "linear-probe", "--job-json", json.dumps(desc),
                      env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "RATATOUILLE_DEVICE": "cpu"}, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="out/")["Contents"]}
    assert {"out/linear-probe/DONE", "out/linear-probe/model.safetensors", "out/linear-probe/metrics.json"} <= keys
