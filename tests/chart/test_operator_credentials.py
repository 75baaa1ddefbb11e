"""The operator gets storage credentials only by reference to the configured Secret."""
from tests.chart import helmutil


def test_operator_reads_storage_keys_from_the_secret_by_reference():
    container = helmutil.operator_container({"storage": {"credentialsSecret": "s3-creds"}})
    env = {e["name"]: e for e in container["env"]}
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env[var]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "s3-creds", "key": var, "optional": True}
        assert "value" not in env[var]


def test_without_a_secret_the_operator_gets_no_keys():
    env = {e["name"] for e in helmutil.operator_container({})["env"]}
    assert "AWS_ACCESS_KEY_ID" not in env and "AWS_SECRET_ACCESS_KEY" not in env
