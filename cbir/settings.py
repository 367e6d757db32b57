"""Settings: a conf/<profile>.yaml, then --conf FILE, then CBIR_* variables, then --set KEY=VALUE.

Each layer is a pydantic-settings source; pydantic-settings merges them and validates once, and an
error names the key, the value and the layer it came from. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
import typing
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from croniter import CroniterError, croniter
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cbir import uris
from cbir.errors import UsageError

PROFILES = ("local", "s3", "cluster", "offline")
ENV_PREFIX = "CBIR_"
# Variables that choose the layers rather than being settings themselves.
ENV_CONTROL = {"CBIR_PROFILE", "CBIR_CONF"}
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "MPO")
REFERENCE_KINDS = ("caption", "label", "neighbour", "title", "description", "tags", "given")  # cbir.references.KINDS
# The names of the registry in models/encoders.py (cbir imports no model code), so settings fail at start;
# tests/test_encoders.py checks that the two agree.
ENCODERS = ("vgg16", "efficientnet_lite0")
MAX_K = 1000  # results per query, at most: the query.k setting, query files, cbir search, the web API
MASK = "**********"  # a secret as shown (pydantic shows a SecretStr so)
# A name (a setting's dotted key, or a key of a free-form map such as spark.conf's
# spark.hadoop.fs.s3a.secret.key) that may hold a secret: its value is never shown.
SECRET_NAME = re.compile(r"secret|passw(or)?d|token|key|credential", re.IGNORECASE)
NOT_SECRET = {"crawl.opt_out_tokens"}  # settings whose names only look like a secret's
USERINFO = re.compile(r"(?<=://)[^/?#@\s]*@")  # user:password@ in a URL


def is_secret(key: str) -> bool:
    """Whether the value at key (dotted; a free-form map's key included) is never shown."""
    return key not in NOT_SECRET and bool(SECRET_NAME.search(key))


def masked(data: Any, key: str = "") -> Any:
    """Settings (JSON-ready data, or the part of them at dotted key) as they may be shown: every value
    under a secret-looking name masked, in free-form maps too, and user:password@ in URLs. The one helper
    for every place that shows settings (cbir info, error lines, reprs)."""
    if isinstance(data, Mapping):
        return {name: masked(value, f"{key}.{name}" if key else str(name)) for name, value in data.items()}
    if isinstance(data, (list, tuple)):
        return [masked(value, key) for value in data]
    if isinstance(data, SecretStr) or (is_secret(key) and data not in (None, "")):
        return MASK
    if isinstance(data, str):
        return USERINFO.sub("***@", data)
    return data


def _split(value: Any) -> Any:
    """A list setting given as one string ("a,b" or "a b", from --set or the environment) -> its items."""
    return [part for part in re.split(r"[,\s]+", value) if part] if isinstance(value, str) else value


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    def __repr_args__(self):  # repr() and str() too show no secret
        for name, value in super().__repr_args__():
            yield name, value if isinstance(value, BaseModel) else masked(value, str(name))


class S3(Section):
    """Any S3-compatible endpoint. Credentials default to the AWS_* variables and the usual chain."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None

    @field_validator("endpoint_url")
    @classmethod
    def _http_endpoint(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+/?$", value):
            raise ValueError("must look like http(s)://host[:port]")
        return value


class Spark(Section):
    master: str = "local[*]"
    partitions: int = Field(0, ge=0, description="0: about 1,000 items a partition, at least 4 per core")
    driver_memory: str = "2g"
    # Executors (a cluster's; local mode runs tasks in the driver's JVM): sized so that TF threads per task
    # x tasks per executor = its cores, and each Python worker keeps its loaded models from task to task.
    executor_cores: int = Field(0, ge=0, description="cores per executor; 0: the cluster manager's default")
    executor_memory: str = Field("1g", pattern=r"^\d+[kmgt]?$", description="JVM heap per executor")
    task_cpus: int = Field(1, ge=1, description="cores per task: TensorFlow threads per task on a cluster")
    python_worker_reuse: bool = Field(True, description="keep Python workers (and their loaded models) between tasks")
    ui: bool = False
    conf: dict[str, str] = {}
    cluster_allow_remote: bool = Field(
        False, description="let `cbir cluster start --host` listen on an address that is not loopback"
    )

    @field_validator("master")
    @classmethod
    def _known_master(cls, value: str) -> str:
        if not re.match(r"^(local(\[(\*|\d+)(,\d+)?\])?|(spark|k8s|mesos)://\S+|yarn)$", value):
            raise ValueError("must be local, local[N], local[*], spark://HOST:PORT, k8s://URL or yarn")
        return value


class Ingest(Section):
    max_bytes: int = Field(50 * 2**20, gt=0)
    max_pixels: int = Field(89_478_485, gt=0)
    formats: list[str] = list(IMAGE_FORMATS)
    threads: int = Field(8, ge=1, le=256, description="concurrent reads per Spark task")

    @field_validator("formats", mode="before")
    @classmethod
    def _format_list(cls, value: Any) -> Any:
        value = _split(value)
        if isinstance(value, list):
            value = [str(part).upper() for part in value]
            unknown = sorted(set(value) - set(IMAGE_FORMATS))
            if unknown:
                raise ValueError(f"unknown format {unknown[0]}; known: {', '.join(IMAGE_FORMATS)}")
        return value


class Flickr(Section):
    """The Flickr API (photos.search). The key and secret also come from CBIR_FLICKR__API_KEY / __API_SECRET."""

    api_key: SecretStr | None = None
    api_secret: SecretStr | None = None
    rest_url: str = Field("https://api.flickr.com/services/rest/", pattern=r"^https?://\S+$")
    sizes: list[str] = Field(
        ["b", "c", "z", "o"],
        description="photo sizes to store, first available wins "
        "(Flickr's size letters: b 1024 px, c 800, z 640, o original, ...)",
    )
    per_page: int = Field(250, ge=1, le=500)
    calls_per_hour: int = Field(3000, ge=1, le=3600, description="API calls; Flickr allows 3,600 an hour per key")
    rate_limit_wait_s: float = Field(60.0, ge=0, description="pause after Flickr says too many calls, then resume")
    rate_limit_waits: int = Field(10, ge=0, description="pauses in a row before the crawl gives up")
    timeout_s: float = Field(30.0, gt=0)

    @field_validator("sizes", mode="before")
    @classmethod
    def _size_list(cls, value: Any) -> Any:
        value = _split(value)
        if isinstance(value, list):
            bad = [v for v in value if not re.fullmatch(r"[a-z0-9]{1,3}", str(v))]
            if bad or not value:
                raise ValueError("give Flickr size letters such as b, c, z, o")
        return value


class Crawl(Section):
    """Downloading from the web: polite, bounded and refusing private addresses unless allowed."""

    allow_hosts: list[str] = Field([], description="hosts or CIDRs exempt from the private-address guard")
    user_agent: str = Field(
        "cbir/0.1 (caption-based image search crawler)",
        pattern=r"(?i)^cbir\b[^\r\n]*$",
        description="names cbir first, so sites can address it in robots rules",
    )
    contact_url: str | None = Field(
        None,
        pattern=r"^(https?://|mailto:)\S+$",
        description="where site owners reach the operator; sent in the User-Agent",
    )
    opt_out_tokens: list[str] = Field(
        ["noai", "noimageai", "noindex", "noimageindex"],
        description="X-Robots-Tag directives that keep an image out; empty: none",
    )
    timeout_s: float = Field(15.0, gt=0, description="per request: connect, and between bytes read")
    deadline_s: float = Field(60.0, gt=0, description="per URL: redirects, retries, waits and the body together")
    retries: int = Field(3, ge=0, le=10, description="on timeouts, connection errors, 5xx and 429")
    backoff_s: float = Field(0.5, ge=0, description="first retry's wait; doubles each time, with full jitter")
    max_wait_s: float = Field(60.0, ge=0, description="the longest wait before a retry, Retry-After included")
    per_host_per_s: float = Field(20.0, gt=0, description="requests per second to one host, all tasks together")
    concurrency: int = Field(32, ge=1, le=256, description="downloads in flight per Spark task")
    max_redirects: int = Field(5, ge=0, le=20)
    resize: int = Field(0, ge=0, description="shrink stored copies to this longest side in pixels; 0 keeps them")
    schedule: str = Field("0 3 * * *", description="cron of the scheduled crawl deployment")

    _token_list = field_validator("opt_out_tokens", mode="before")(_split)

    @field_validator("allow_hosts", mode="before")
    @classmethod
    def _host_list(cls, value: Any) -> Any:
        value = _split(value)
        for item in value if isinstance(value, list) else []:
            if "/" in str(item):
                try:
                    ipaddress.ip_network(str(item), strict=False)
                except ValueError:
                    raise ValueError(f"{item} is not a CIDR") from None
        return value

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return _cron_expression(value)

    @property
    def agent(self) -> str:
        """The User-Agent: the product and, when set, the contact URL inside its comment."""
        if not self.contact_url:
            return self.user_agent
        if self.user_agent.endswith(")"):
            return f"{self.user_agent[:-1]}; +{self.contact_url})"
        return f"{self.user_agent} (+{self.contact_url})"


class Index(Section):
    schedule: str = Field("0 4 * * *", description="cron of the scheduled index deployment (cbir serve)")

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return _cron_expression(value)


class Maintenance(Section):
    schedule: str = Field("30 3 * * 0", description="cron of the scheduled lake maintenance (cbir serve)")
    retention_hours: int = Field(
        168,
        ge=1,
        description="vacuum keeps what the versions of this many last hours need (the parts of runs in flight, "
        "which no version names yet, are kept 168 hours whatever this says)",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        return _cron_expression(value)


def _cron_expression(value: str) -> str:
    """Five fields whose values croniter accepts (Prefect's schedules read them with croniter too)."""
    if len(value.split()) != 5:
        raise ValueError("must be a cron expression of 5 fields, e.g. '0 3 * * *'")
    try:
        croniter(value)
    except (CroniterError, ValueError) as exc:
        detail = str(exc).removeprefix(f"[{value}] ")
        detail = detail.replace("is not acceptable, out of range", "a value is out of range")
        raise ValueError(f"not a valid cron expression: {detail}") from None
    return value


class Encoder(Section):
    name: str = "vgg16"
    weights: str = Field(
        "imagenet",
        description="imagenet (VGG16: Keras download; EfficientNet-Lite0: its pip "
        "package), random (tests only) or a weights file",
    )
    batch_size: int = Field(16, ge=1, le=4096)
    threads: int = Field(0, ge=0, description="TensorFlow threads per Spark task; 0: cores / parallel tasks")
    dtype: Literal["float16", "float32"] = Field("float16", description="how feature vectors are stored")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="encoder arithmetic; auto: bfloat16 where the CPU has it (AMX or AVX512-BF16)"
    )

    @field_validator("name")
    @classmethod
    def _registered(cls, value: str) -> str:
        if value not in ENCODERS:
            raise ValueError(f"unknown encoder; known: {', '.join(ENCODERS)}")
        return value


class Captioner(Section):
    version: str = Field(
        "current",
        pattern=r"^(current|\d{8}T\d{6}Z-[0-9a-f]{8})$",
        description="current, or a version: the run id that cbir train printed",
    )
    embedding_dim: int = Field(256, ge=1)
    units: int = Field(256, ge=1)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)
    min_word_count: int = Field(2, ge=1)
    max_length: int = Field(40, ge=3, le=200, description="tokens per caption, markers included")
    decode: Literal["greedy", "beam"] = "beam"
    beam_width: int = Field(3, ge=1, le=50)
    captions_per_image: int = Field(
        3, ge=1, le=50, description="distinct captions kept per image, at most (greedy: one)"
    )
    no_repeat_ngram: int = Field(
        1, ge=0, le=10, description="0: off; 1: no word twice; n: no word right after itself, no n-gram twice"
    )
    length_penalty: float = Field(0.5, ge=0, le=2, description="beam: rank beams by log-probability / length ** this")
    labels_per_image: int = Field(3, ge=0, le=20, description="the encoder's ImageNet labels kept per image")
    label_threshold: float = Field(0.2, ge=0, le=1, description="the least probability a kept label has")
    neighbours: int = Field(3, ge=0, le=20, description="texts of the nearest training images kept per image")
    memory_images: int = Field(100_000, ge=0, description="training images a captioner remembers for neighbours")


class Train(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    patience: int = Field(3, ge=1, description="epochs without a better dev score before stopping")
    monitor: Literal["bleu", "loss"] = Field(
        "loss", description="what early stopping watches on the dev split: BLEU of its decoded captions, or the loss"
    )
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="share of each target spread over the vocabulary")
    likeness_head: bool = Field(
        False, description="fit the learned likeness (models.likeness) on the memory's space; false: the raw space"
    )
    likeness_epochs: int = Field(20, ge=1, le=1000, description="epochs of the learned likeness's triplet loss")
    likeness_margin: float = Field(0.2, gt=0, le=2, description="the triplet loss's margin, in cosine")
    dev_fraction: float = Field(0.1, ge=0, lt=0.5, description="for data sets without splits")
    test_fraction: float = Field(0.1, ge=0, lt=0.5)
    seed: int = 0


class Bleu(Section):
    """How a query is scored against an image's texts: nltk's sentence_bleu with these arguments."""

    weights: tuple[float, ...] = (0.25, 0.25, 0.25, 0.25)
    smoothing: Literal["method0", "method1", "method2", "method3"] = "method1"
    auto_reweigh: bool = True
    references: list[str] = Field(
        list(REFERENCE_KINDS),
        description="the kinds of an image's texts that count: "
        "caption, label, neighbour (generated), title, description, tags, given "
        "(from its source)",
    )

    @field_validator("references", mode="before")
    @classmethod
    def _kinds(cls, value: Any) -> Any:
        value = _split(value)
        if isinstance(value, list):
            unknown = sorted(set(map(str, value)) - set(REFERENCE_KINDS))
            if unknown or not value:
                raise ValueError(f"give one or more of {', '.join(REFERENCE_KINDS)}")
        return value

    @field_validator("weights", mode="before")
    @classmethod
    def _weight_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = _split(value.strip("()[] "))
        if isinstance(value, (list, tuple)):
            if not 1 <= len(value) <= 8:
                raise ValueError("give 1 to 8 weights, one per n-gram order")
            if any(float(v) < 0 for v in value) or not any(float(v) > 0 for v in value):
                raise ValueError("weights are non-negative and not all 0")
        return value


class Likeness(Section):
    """Likeness: how much an image looks like a query's picture (the cosine of its stored likeness vector, in
    the captioner memory's space, with the picture), which re-ranks the query's pool by BLEU."""

    text_images: int = Field(
        3,
        ge=0,
        le=100,
        description="text queries borrow a picture: the remembered images whose texts match best, averaged; 0: off",
    )
    text_weight: float = Field(0.25, ge=0, le=1, description="text queries: the share of likeness in the ranking")
    text_pool: int = Field(50, ge=0, le=10_000, description="text queries: BLEU candidates that the picture re-ranks")
    all_images: int = Field(
        100_000,
        ge=0,
        description="an index of at most this many images has every image ranked by likeness to a text query's "
        "picture, not only the pool",
    )
    image: bool = Field(False, description="image queries re-rank their BLEU pool by likeness to their own picture")
    image_weight: float = Field(0.5, ge=0, le=1, description="image queries: the share of likeness in the ranking")
    image_pool: int = Field(5, ge=1, le=100, description="image queries: BLEU candidates per result re-ranked")
    example_weight: float = Field(
        0.5, ge=0, le=1, description="queries with example images: the share of likeness in the ranking"
    )
    rocchio: tuple[float, float, float] = Field(
        (1.0, 0.75, 0.25),
        description="queries with example images: the picture is a x the text's + b x the positives' mean - "
        "c x the negatives' mean, (a, b, c)",
    )


class Duplicates(Section):
    """Near-duplicates: images whose likeness vectors (the captions' `visual` column) have a cosine of at least
    the threshold (search.duplicates): `cbir duplicates` lists them, the page folds them under the first."""

    threshold: float = Field(
        0.995, gt=0, le=1, description="the least cosine of two images' likeness vectors that makes them copies"
    )
    fold: bool = Field(True, description="fold a result under a higher-ranked one it copies (the page and the API)")


class Query(Section):
    k: int = Field(10, ge=1, le=MAX_K, description="results per query, unless a query row says otherwise")
    gallery_queries: int = Field(200, ge=1, description="queries shown in a run's gallery")
    max_words: int = Field(
        100,
        ge=1,
        le=10_000,
        description="longer text queries are refused (query files, "
        "cbir search, cbir web): one row must not take minutes of engine time; "
        "so are texts of over 50 characters per word of this cap",
    )
    max_file_bytes: int = Field(
        64 * 2**20, gt=0, description="larger query files (decompressed) are refused, read no further"
    )
    max_rows: int = Field(100_000, ge=1, description="query files with more rows are refused")
    max_examples: int = Field(
        20, ge=1, le=1000, description="a query with more example images (positive and negative) is refused"
    )


class Web(Section):
    """cbir web: the search page and its JSON API."""

    host: str = Field("127.0.0.1", min_length=1, description="the address to listen on")
    port: int = Field(8080, ge=1, le=65535)
    max_upload_bytes: int = Field(10 * 2**20, gt=0, description="larger uploads are refused (HTTP 413)")
    max_upload_pixels: int = Field(
        16_777_216,
        gt=0,
        description="larger uploads are refused (HTTP 413) before decoding; each decode takes up to 4 bytes a pixel",
    )
    decodes: int = Field(2, ge=1, le=64, description="images decoded at once (uploads and thumbnails)")
    max_uploads: int = Field(
        4,
        ge=1,
        le=1024,
        description="uploads read or answered at once; more are refused (HTTP 503 with Retry-After) before they "
        "are read: at most this x web.max_upload_bytes of bodies in memory, however many clients send or stall",
    )
    upload_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="an upload's body must arrive within this many seconds (else HTTP 408)"
    )
    trusted_hosts: list[str] = Field(
        [], description="Host header names served besides 127.0.0.1, localhost and web.host (a reverse proxy's name)"
    )
    reload_s: float = Field(5.0, ge=0, description="look for a newer index run at most this often; 0: never")

    _host_list = field_validator("trusted_hosts", mode="before")(_split)


class Ui(Section):
    """cbir ui: the Prefect server and its UI."""

    allowed_origins: list[str] = Field([], description="browser origins besides the UI's own that may call the API")
    csrf: bool = Field(True, description="state-changing API calls need a CSRF token (Prefect's clients fetch one)")
    trusted_hosts: list[str] = Field([], description="Host names served besides 127.0.0.1, localhost and --host")

    _host_list = field_validator("trusted_hosts", mode="before")(_split)

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: Any) -> Any:
        value = _split(value)
        for item in value if isinstance(value, list) else []:
            if item == "*" or not re.fullmatch(r"https?://[^/\s]+", str(item)):
                raise ValueError(f"{item} is not an origin (scheme://host[:port], no *)")
        return value


class Settings(BaseSettings):
    """All settings. Its sources are the layers load_settings reads, highest last; built any other way
    (Settings()), it holds the defaults."""

    model_config = SettingsConfigDict(extra="forbid", validate_default=True)

    profile: str = "local"
    state_dir: str = ".cbir"
    lake: str = ".cbir/lake"
    s3: S3 = S3()
    spark: Spark = Spark()
    ingest: Ingest = Ingest()
    flickr: Flickr = Flickr()
    crawl: Crawl = Crawl()
    index: Index = Index()
    maintenance: Maintenance = Maintenance()
    encoder: Encoder = Encoder()
    captioner: Captioner = Captioner()
    train: Train = Train()
    bleu: Bleu = Bleu()
    query: Query = Query()
    likeness: Likeness = Likeness()
    duplicates: Duplicates = Duplicates()
    web: Web = Web()
    ui: Ui = Ui()

    @field_validator("lake")
    @classmethod
    def _lake_uri(cls, value: str) -> str:
        if uris.scheme(value) not in (None, "s3", "file"):
            raise ValueError("must be a local folder or an s3://bucket/prefix URI")
        if uris.is_s3(value) and not re.match(r"^s3://[a-z0-9][a-z0-9.-]{2,62}(/|$)", value):
            raise ValueError("must name a bucket: s3://bucket/prefix")
        return value

    @property
    def lake_is_local(self) -> bool:
        return not uris.is_s3(self.lake)

    def public(self) -> dict[str, Any]:
        """The settings as JSON-ready data, secrets masked."""
        return masked(self.model_dump(mode="json"))

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, value if isinstance(value, BaseModel) else masked(value, str(name))

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, *reversed(_LAYERS.get()))  # the first wins


_LAYERS: ContextVar[tuple[Layer, ...]] = ContextVar("cbir_settings_layers", default=())


def load_settings(
    profile: str | None = None,
    conf_file: str | None = None,
    overrides: Iterable[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the layers (pydantic-settings sources), validate once, and make local paths absolute."""
    environ = os.environ if environ is None else environ
    profile = profile or environ.get("CBIR_PROFILE") or "local"
    conf_file = conf_file or environ.get("CBIR_CONF")
    layers = [Layer(f"profile '{profile}'", _profile_layer(profile))]
    if conf_file:
        layers.append(Layer(conf_file, _yaml_layer(conf_file)))
    layers += _env_layers(environ)
    layers.append(Layer("--set", _set_layer(overrides)))
    token = _LAYERS.set(tuple(layers))
    try:
        settings = Settings(profile=profile)
    except ValidationError as exc:
        raise UsageError(_describe(exc.errors()[0], layers)) from None
    finally:
        _LAYERS.reset(token)
    return _absolute_paths(settings)


class Layer(PydanticBaseSettingsSource):
    """One layer of settings (a profile, a file, a variable, --set) and the name errors give where it came from."""

    def __init__(self, origin: str, data: dict[str, Any]):
        super().__init__(Settings)
        self.origin, self.data = origin, data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self.data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self.data

    def holds(self, path: tuple[str, ...]) -> bool:
        node: Any = self.data
        for part in path:
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True


def _profile_layer(name: str) -> dict[str, Any]:
    if name not in PROFILES:
        raise UsageError(f"unknown profile '{name}'; profiles: {', '.join(PROFILES)}")
    return _parse_yaml(resources.files("conf").joinpath(f"{name}.yaml").read_text(), f"profile '{name}'")


def _yaml_layer(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read settings file {path}: {exc.strerror}") from None
    return _parse_yaml(text, path)


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"settings file {origin} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UsageError(f"settings file {origin} must hold a mapping of settings")
    return data


def _env_layers(environ: Mapping[str, str]) -> list[Layer]:
    """CBIR_SECTION__KEY=value -> {section: {key: value}}, one layer a variable so errors can name it.
    Only variables that name a setting or a section are read: CBIR_HOME and the like belong to others."""
    layers = []
    for name, value in sorted(environ.items()):
        path = name[len(ENV_PREFIX) :].lower().split("__")
        if name.startswith(ENV_PREFIX) and name not in ENV_CONTROL and path[0] in Settings.model_fields:
            origin = f"environment variable {name}"
            layer: dict[str, Any] = {}
            _assign(layer, path, value, origin)
            layers.append(Layer(origin, layer))
    return layers


def _set_layer(overrides: Iterable[str]) -> dict[str, Any]:
    layer: dict[str, Any] = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got '{item}'")
        _assign(layer, _split_key(key.strip()), value, "--set")
    return layer


def override_variables(overrides: Iterable[str]) -> dict[str, str]:
    """--set KEY=VALUE items as the CBIR_* environment variables that say the same, for processes started
    later (the runs `cbir serve` starts). Environment names are case-blind: keys are lowercased."""
    variables = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set needs KEY=VALUE, got '{item}'")
        variables[ENV_PREFIX + "__".join(_split_key(key.strip())).upper()] = value
    return variables


def _split_key(key: str) -> list[str]:
    """Dotted key -> path; below a mapping-valued setting (spark.conf) the rest is one key."""
    parts = key.split(".")
    model: type[BaseModel] | None = Settings
    for i, part in enumerate(parts):
        field = model.model_fields.get(part) if model else None
        if field is None:
            return parts
        annotation = field.annotation
        if getattr(annotation, "__origin__", None) is dict:
            return parts[: i + 1] + [".".join(parts[i + 1 :])] if i + 1 < len(parts) else parts
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return parts


def _assign(layer: dict[str, Any], path: list[str], raw: str, origin: str) -> None:
    """Set one value; errors name the key and where it came from, never the value (it may be a secret)."""
    key = ".".join(path)
    annotation = _annotation(path)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        raise UsageError(f"{key} is a section (from {origin}): set its keys, e.g. {key}.KEY=VALUE")
    for i in range(1, len(path)):
        above = _annotation(path[:i])
        if (
            above is not None
            and typing.get_origin(above) is not dict
            and not (isinstance(above, type) and issubclass(above, BaseModel))
        ):
            raise UsageError(f"unknown setting '{key}' (from {origin}): {'.'.join(path[:i])} has no keys")
    node = layer
    for i, part in enumerate(path[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UsageError(f"{key} (from {origin}) is inside {'.'.join(path[: i + 1])}, which has a value of its own")
    # Strings stay strings (pydantic coerces "4" or "true" per field); for list and map settings
    # only, YAML flow syntax makes lists and maps (never for strings: a secret may start with "[").
    if typing.get_origin(annotation) in (list, tuple, dict) and raw.strip()[:1] in ("[", "{"):
        try:
            node[path[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise UsageError(f"bad setting {key} (from {origin}): not a valid [list] or {{map}}") from None
    else:
        node[path[-1]] = raw


def _annotation(path: list[str]) -> Any:
    """The type of the setting at path, or None when there is none (unknown keys, spark.conf's names)."""
    model: Any = Settings
    annotation = None
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        annotation = model = field.annotation
    return annotation


def _origin(loc: tuple[str, ...], layers: list[Layer]) -> str:
    """The layer that gave the value at loc: the last to set it, or else the last to set the nearest key above it."""
    return next(
        (layer.origin for i in range(len(loc), 0, -1) for layer in reversed(layers) if layer.holds(loc[:i])), "defaults"
    )


def _describe(error: dict, layers: list[Layer]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc)
    origin = _origin(loc, layers)
    if error["type"] == "extra_forbidden":
        parent = Settings
        for part in loc[:-1]:
            parent = parent.model_fields[part].annotation
        known = ", ".join(parent.model_fields)
        return f"unknown setting '{key}' (from {origin}); known here: {known}"
    detail = error["msg"].removeprefix("Value error, ")
    return f"bad setting {key}={_shown(loc, error.get('input'))} (from {origin}): {detail}"


def _shown(loc: tuple[str, ...], value: Any) -> str:
    """A bad value as an error line shows it: masked; where a section or map belongs (`s3: AKIA...`), only its type."""
    annotation = _annotation(list(loc))
    if typing.get_origin(annotation) is dict or (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return f"<{type(value).__name__}>"
    return "'***'" if is_secret(".".join(loc)) else repr(masked(value, ".".join(loc)))


def _absolute_paths(settings: Settings) -> Settings:
    updates: dict[str, Any] = {"state_dir": os.path.abspath(os.path.expanduser(settings.state_dir))}
    if settings.lake_is_local:
        path = settings.lake.removeprefix("file://")
        updates["lake"] = os.path.abspath(os.path.expanduser(path))
    else:
        updates["lake"] = settings.lake.rstrip("/")
    return settings.model_copy(update=updates)
