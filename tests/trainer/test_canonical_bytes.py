"""Equal tensors and metadata give equal safetensors bytes in every process (sha256 is lineage)."""
import hashlib
import subprocess
import sys

SCRIPT = """
import sys, torch
from ratatouille_trainer.weights import save_state_dict
torch.manual_seed(0)
save_state_dict({"w": torch.randn(5, 3), "n": torch.tensor(3)}, sys.argv[1],
                {"member": "3", "run": "ns/r", "stage": "target", "foundation": "m", "trainer": "t"})
"""


def test_same_state_same_bytes_across_processes(tmp_path):
    digests = set()
    for i in range(4):  # the library's own metadata order varies with the process's hash seed
        out = tmp_path / f"m{i}.safetensors"
        subprocess.run([sys.executable, "-c", SCRIPT, str(out)], check=True, env={"PYTHONHASHSEED": str(i), "PATH": ""})
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
