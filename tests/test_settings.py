"""Settings: profiles, a YAML file, environment and --set layers; one clear line for each bad key or value."""

from __future__ import annotations

import pytest

from cbir.errors import UsageError
from cbir.settings import load_settings


def test_local_profile_is_the_default_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(environ={})
    assert settings.profile == "local"
    assert settings.spark.master == "local[*]"
    assert settings.lake == str(tmp_path / ".cbir" / "lake")
    assert settings.state_dir == str(tmp_path / ".cbir")


def test_layers_apply_in_order_profile_file_environment_set(tmp_path):
    conf = tmp_path / "mine.yaml"
    conf.write_text("spark:\n  master: local[3]\n  partitions: 5\ningest:\n  threads: 3\n")
    environ = {"CBIR_SPARK__PARTITIONS": "7", "CBIR_INGEST__THREADS": "4", "CBIR_LAKE": "s3://my-bucket/lake/"}
    settings = load_settings("s3", str(conf), ["ingest.threads=9", "spark.conf.spark.executor.memory=3g"], environ)
    assert settings.profile == "s3"
    assert settings.spark.master == "local[3]"  # file over profile
    assert settings.spark.partitions == 7  # environment over file
    assert settings.ingest.threads == 9  # --set over environment
    assert settings.lake == "s3://my-bucket/lake"
    assert settings.spark.conf == {"spark.executor.memory": "3g"}


def test_profile_and_file_can_come_from_the_environment(tmp_path):
    conf = tmp_path / "c.yaml"
    conf.write_text("lake: s3://from-file/x\n")
    settings = load_settings(environ={"CBIR_PROFILE": "cluster", "CBIR_CONF": str(conf)})
    assert settings.profile == "cluster" and settings.spark.master.startswith("spark://")
    assert settings.lake == "s3://from-file/x"


def test_lists_from_set_and_environment():
    settings = load_settings(overrides=["ingest.formats=jpeg, png"], environ={})
    assert settings.ingest.formats == ["JPEG", "PNG"]
    settings = load_settings(overrides=["ingest.formats=[webp]"], environ={})
    assert settings.ingest.formats == ["WEBP"]


@pytest.mark.parametrize(
    "overrides, environ, message",
    [
        (["spark.mastr=local"], {}, "unknown setting 'spark.mastr' (from --set); known here: master, partitions"),
        ([], {"CBIR_SPARK__MASTR": "1"}, "unknown setting 'spark.mastr' (from environment variable CBIR_SPARK__MASTR)"),
        (["flickr=x", "flickr.api_key=y"], {}, "flickr is a section (from --set): set its keys, e.g. flickr.KEY=VALUE"),
        (["flickr.api_key=y", "flickr=x"], {}, "flickr is a section (from --set)"),
        (["lake.sub=x"], {}, "unknown setting 'lake.sub' (from --set): lake has no keys"),
        (["ingest.formats=[jpeg"], {}, "bad setting ingest.formats (from --set): not a valid [list] or {map}"),
        (
            ["spark.partitions=many"],
            {},
            "bad setting spark.partitions='many' (from --set): Input should be a valid integer",
        ),
        (
            ["spark.partitions=-1"],
            {},
            "bad setting spark.partitions='-1' (from --set): Input should be greater than or equal to 0",
        ),
        (["spark.master=mesos"], {}, "bad setting spark.master='mesos' (from --set): must be local"),
        (
            ["lake=gs://b/x"],
            {},
            "bad setting lake='gs://b/x' (from --set): must be a local folder or an s3://bucket/prefix URI",
        ),
        (["ingest.formats=JPEG,HEIC"], {}, "unknown format HEIC"),
        (
            ["s3.endpoint_url=minio:9000"],
            {},
            "bad setting s3.endpoint_url='minio:9000' (from --set): must look like http(s)://host[:port]",
        ),
        (["lake"], {}, "--set needs KEY=VALUE, got 'lake'"),
        (
            ["crawl.schedule=0 3 * *"],
            {},
            "bad setting crawl.schedule='0 3 * *' (from --set): must be a cron expression of 5 fields",
        ),
        (
            [],
            {"CBIR_INDEX__SCHEDULE": "61 * * * *"},
            "bad setting index.schedule='61 * * * *' (from environment "
            "variable CBIR_INDEX__SCHEDULE): not a valid cron expression: a "
            "value is out of range",
        ),
        (["crawl.schedule=*/0 * * * *"], {}, "crawl.schedule='*/0 * * * *' (from --set): not a valid cron expression"),
    ],
)
def test_bad_settings_name_the_key_the_value_and_where_it_came_from(overrides, environ, message):
    with pytest.raises(UsageError) as caught:
        load_settings(overrides=overrides, environ=environ)
    text = str(caught.value)
    assert message in text and "\n" not in text


def test_bad_profile_and_files(tmp_path):
    with pytest.raises(UsageError, match="unknown profile 'prod'; profiles: local, s3, cluster"):
        load_settings("prod", environ={})
    with pytest.raises(UsageError, match="cannot read settings file"):
        load_settings(conf_file=str(tmp_path / "missing.yaml"), environ={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("spark: [unclosed\n")
    with pytest.raises(UsageError, match="is not valid YAML"):
        load_settings(conf_file=str(bad), environ={})
    typo = tmp_path / "typo.yaml"
    typo.write_text("ingest:\n  max_byte: 10\n")
    with pytest.raises(UsageError, match=f"unknown setting 'ingest.max_byte' \\(from {typo}\\)"):
        load_settings(conf_file=str(typo), environ={})


def test_secrets_are_masked_in_public_settings_and_errors():
    environ = {"CBIR_S3__ACCESS_KEY": "AKIAREALKEY", "CBIR_S3__SECRET_KEY": "very-secret-value"}
    settings = load_settings("s3", environ=environ)
    assert settings.s3.secret_key.get_secret_value() == "very-secret-value"
    public = str(settings.public())
    assert "very-secret-value" not in public and "AKIAREALKEY" not in public
    assert "very-secret-value" not in repr(settings)
    with pytest.raises(UsageError) as caught:
        load_settings(overrides=["s3.secret_key="], environ={"CBIR_S3__ENDPOINT_URL": "[bad"})
    assert "s3.endpoint_url='[bad'" in str(caught.value)
    # Secrets are strings whatever they start with: never parsed as YAML, never echoed.
    environ = {"CBIR_FLICKR__API_KEY": "[my-secret", "CBIR_FLICKR__API_SECRET": "{also: secret"}
    settings = load_settings(environ=environ)
    assert settings.flickr.api_key.get_secret_value() == "[my-secret"
    assert settings.flickr.api_secret.get_secret_value() == "{also: secret"
    with pytest.raises(UsageError) as caught:
        load_settings(overrides=["flickr.per_page=0"], environ=environ)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


SPARK_SECRETS = [
    "spark.conf.spark.hadoop.fs.s3a.secret.key=s3a-secret-value",
    "spark.conf.spark.authenticate.secret=spark-auth-secret",
    "spark.conf.spark.ssl.keyStorePassword=keystore-password",
    "spark.conf.spark.executor.memory=3g",
    "s3.endpoint_url=http://minio-user:minio-password@minio.local:9000",
]


def test_secret_looking_keys_of_free_form_maps_and_url_userinfo_are_masked_wherever_settings_are_shown():
    settings = load_settings(overrides=SPARK_SECRETS, environ={})
    assert settings.spark.conf["spark.authenticate.secret"] == "spark-auth-secret"  # the job gets it
    public = settings.public()
    assert public["spark"]["conf"] == {
        "spark.hadoop.fs.s3a.secret.key": "**********",
        "spark.authenticate.secret": "**********",
        "spark.ssl.keyStorePassword": "**********",
        "spark.executor.memory": "3g",
    }
    assert public["s3"]["endpoint_url"] == "http://***@minio.local:9000"
    assert public["crawl"]["opt_out_tokens"] == ["noai", "noimageai", "noindex", "noimageindex"]  # no secret
    for shown in (str(public), repr(settings), str(settings), repr(settings.spark), str(settings.s3)):
        assert not any(word in shown for word in ("secret-value", "auth-secret", "keystore-password", "minio-password"))


@pytest.mark.parametrize(
    "yaml_text, message, secret",
    [
        ('s3: "AKIASECTIONVALUE"\n', "bad setting s3=<str> (from {conf}): Input should be", "AKIASECTIONVALUE"),
        (
            "s3: {endpoint_url: 'http://user:hunter2@host/path'}\n",
            "bad setting s3.endpoint_url='http://***@host/path' (from {conf})",
            "hunter2",
        ),
        (
            "spark: {conf: 'spark.authenticate.secret=hunter2'}\n",
            "bad setting spark.conf=<str> (from {conf})",
            "hunter2",
        ),
        (
            "spark: {conf: {spark.authenticate.secret: [hunter2]}}\n",
            "bad setting spark.conf.spark.authenticate.secret='***' (from {conf})",
            "hunter2",
        ),
        ("lake: 's3://user:hunter2@bucket/x'\n", "bad setting lake='s3://***@bucket/x' (from {conf})", "hunter2"),
    ],
)
def test_error_lines_never_echo_a_secret(tmp_path, yaml_text, message, secret):
    conf = tmp_path / "conf.yaml"
    conf.write_text(yaml_text)
    with pytest.raises(UsageError) as caught:
        load_settings(conf_file=str(conf), environ={})
    assert message.format(conf=conf) in str(caught.value) and secret not in str(caught.value)


def test_variables_that_name_no_setting_belong_to_others():
    settings = load_settings(environ={"CBIR_HOME": "/opt/cbir", "CBIR_NOPE": "1", "CBIR_WEB__PORT": "9000"})
    assert settings.web.port == 9000


def test_the_real_environment_is_read_by_default(monkeypatch):
    monkeypatch.setenv("CBIR_SPARK__DRIVER_MEMORY", "3g")
    assert load_settings().spark.driver_memory == "3g"
