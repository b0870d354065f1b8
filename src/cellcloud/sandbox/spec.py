"""What an environment is made of: the contract between the agent and every sandbox backend."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# A function's environment variable asking for an isolation (docs/microvm.md): "microvm" runs
# it only on an agent whose backend is microvm; an agent that cannot refuses it at create.
ISOLATION_VARIABLE = "CELLCLOUD_ISOLATION"
ISOLATIONS = ("microvm",)

_IMAGE_MAY_SET = frozenset({"PATH", "LANG", "TZ", "HOME", "LAMBDA_TASK_ROOT",
                            "LAMBDA_RUNTIME_DIR"})


@dataclass
class EnvSpec:
    env_id: str
    function_name: str
    function_version: str
    function_arn: str
    handler: str
    runtime: str
    memory_mb: int
    timeout_s: int
    bundle_dir: str  # host path of the unpacked, measured bundle
    uid: int
    gid: int
    cgroup_group: str  # cellcloud/<group>/<env_id>
    region: str = "cc-local-1"
    ephemeral_mb: int = 512
    pids_max: int = 1024
    nofile_max: int = 1024
    environment: dict[str, str] = field(default_factory=dict)
    log_group: str = ""
    log_stream: str = ""
    layer_dirs: list[str] = field(default_factory=list)  # unpacked layers, in the function's order
    # Tests only: isolation layers switched off, to prove each layer is the one that stops an
    # attack (negative controls). The agent never sets this from its API; see jail.LAYERS.
    disabled_layers: list[str] = field(default_factory=list)
    # How the function's runtime starts: [] for the built-in python runtime (a thread of the
    # guest agent); else the argv of a runtime process that speaks the Runtime API over HTTP.
    runtime_argv: list[str] = field(default_factory=list)
    extra_trees: list[str] = field(default_factory=list)  # host dirs that runtime needs (ro)
    # The agent runs with --allow-unlimited: an environment may start without cgroup limits
    # on a host that has no cgroup hierarchy (otherwise the zygote refuses to spawn it).
    allow_unlimited: bool = False
    attestation: str = ""  # the agent's signed document, readable at /var/runtime/attestation.json
    # The environment's interface (network/policy.py Plan.env_info: address, gateway, resolver,
    # interface); empty: only its own loopback. The zygote then gets the netns fd with the spec.
    network: dict[str, Any] = field(default_factory=dict)
    # An image-rooted environment (docs/images.md): the unpacked layers (host dirs, bottom
    # first) become the root as read-only overlayfs lower dirs with a private upper; the
    # image's WORKDIR is the working directory and its ENV sits under Lambda's variables.
    # bundle_dir is then unused ("") and runtime_argv is ENTRYPOINT + CMD.
    image_layers: list[str] = field(default_factory=list)
    image_workdir: str = ""
    image_env: dict[str, str] = field(default_factory=dict)
    # SnapStart (microvm backend only): the version's identity ("<version ARN> <code SHA-256>");
    # its environments are restored from the version's snapshot taken after its init
    # (microvm/agentsnap.py); "": none.
    snapstart: str = ""
    # What runs as pid 1: "lambda" (guest.py: the Runtime API, runtime_argv its runtime) or
    # "container" (container_guest.py: a task's container, runtime_argv its ENTRYPOINT + CMD,
    # with exactly image_env as its environment; agent/tasks.py).
    guest: str = "lambda"
    # The cgroup to join (under cgroup_group), made and sized by the agent beforehand (a
    # task's, shared by its containers); "": the environment's own, named env_id, made here.
    cgroup_name: str = ""
    hostname: str = ""  # "": "sandbox"
    # A task's volumes (agent/tasks.py, ECS mountPoints): {"source": the host path where its
    # volume helper mounted the volume's ext4, "target": the containerPath, "read_only"},
    # bind-mounted into the root (jail.build_root); the target's directory becomes the
    # environment user's when writable.
    volume_mounts: list[dict[str, Any]] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, doc: dict[str, Any]) -> EnvSpec:
        return cls(**doc)

    def process_environment(self) -> dict[str, str]:
        """The environment variables of the environment's first process."""
        if self.guest == "container":
            env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                   "HOSTNAME": self.hostname or "sandbox", "HOME": "/root"}
            env.update(self.image_env)  # the image's ENV, then the container's own (merged)
            return env
        return self.lambda_environment()

    def lambda_environment(self) -> dict[str, str]:
        """Lambda's standard variables, then the function's own (which may not override them)."""
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/opt/bin",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "LAMBDA_TASK_ROOT": "/var/task",
            "LAMBDA_RUNTIME_DIR": "/var/runtime",
            "_HANDLER": self.handler,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EXECUTION_ENV": f"AWS_Lambda_{self.runtime}",
            "AWS_LAMBDA_FUNCTION_NAME": self.function_name,
            "AWS_LAMBDA_FUNCTION_VERSION": self.function_version,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_LOG_GROUP_NAME": self.log_group,
            "AWS_LAMBDA_LOG_STREAM_NAME": self.log_stream,
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "HOME": "/tmp",
        }
        reserved = set(env)
        for k, v in self.image_env.items():
            # The image's own PATH, LANG, TZ, HOME and task root replace Lambda's defaults
            # (as on Lambda); the function's variables below still win over the image's.
            if k not in reserved or k in _IMAGE_MAY_SET:
                env[k] = v
        for k, v in self.environment.items():
            if k not in reserved:
                env[k] = v
        if self.runtime.startswith("nodejs"):
            # As Lambda's Node runtimes set it (layers first); a function's own value wins.
            major = self.runtime.removeprefix("nodejs").split(".")[0]
            env.setdefault("NODE_PATH", f"/opt/nodejs/node{major}/node_modules:"
                           "/opt/nodejs/node_modules:/var/runtime/node_modules:/var/runtime:"
                           "/var/task")
        return env
