"""Protocol peers on another gRPC stack (grpcio, gRPC's C core), for the
interop tests: what they prove cannot be a mistake our two ends share.

Like grpc-go, a grpcio server sends a stream's response headers only with
its first message, so a client that waits for headers before it sends its
first request waits forever. That is how Istio 1.1's Galley behaves.

    peers.py PROTO_DIR OUT_DIR mcp-source [--refuse COLLECTION ...]
    peers.py PROTO_DIR OUT_DIR mcp-limits ADDRESS --streams N --header-bytes N --message-bytes N
    peers.py PROTO_DIR OUT_DIR xds-server
    peers.py PROTO_DIR OUT_DIR xds-client ADDRESS NODE_ID ROUTE_NAME
    peers.py PROTO_DIR OUT_DIR mixer-check ADDRESS USER

The servers print `listening PORT` once they serve on 127.0.0.1, then one
line per event (`ack COLLECTION`, `refused COLLECTION`), and run until
killed. Generated code goes to OUT_DIR.
"""

import argparse
import itertools
import os
import sys
from concurrent import futures

import grpc
import grpc_tools
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTOS = [
    "google/rpc/status.proto",
    "istio/mcp/v1alpha1/mcp.proto",
    "istio/networking/v1alpha3/gateway.proto",
    "istio/networking/v1alpha3/service_entry.proto",
    "istio/networking/v1alpha3/virtual_service.proto",
    "k8s/io/apimachinery/pkg/util/intstr/intstr.proto",
    "k8s/io/apimachinery/pkg/apis/meta/v1/meta.proto",
    "k8s/io/api/core/v1/core.proto",
    "istio/mixer/v1/attributes.proto",
    "istio/mixer/v1/mixer.proto",
]


def generate(proto_dir, out_dir):
    """Compiles the project's protos (and the peer's own ADS subset)."""
    includes = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    for root, names in ((proto_dir, PROTOS), (HERE, ["ads.proto"])):
        args = ["protoc", f"-I{root}", f"-I{proto_dir}", f"-I{includes}",
                f"--python_out={out_dir}", f"--grpc_python_out={out_dir}"]
        if protoc.main(args + names) != 0:
            sys.exit(f"protoc failed on {names}")
    sys.path.insert(0, out_dir)


def say(line):
    print(line, flush=True)


def serve(add_servicer):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add_servicer(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    say(f"listening {port}")
    server.wait_for_termination()


NETWORKING = "istio/networking/v1alpha3/"
DETAILS = "details.bookinfo.svc.cluster.local"


def served():
    """What the MCP source serves, by collection: a Gateway, a ServiceEntry
    and a VirtualService, and a Kubernetes Service with its Endpoints, Pod
    and Node in the raw forms Istio 1.1's Galley sends (a Service and a
    Node as their specs, their labels in the MCP metadata)."""
    from istio.mcp.v1alpha1 import mcp_pb2
    from istio.networking.v1alpha3 import gateway_pb2, service_entry_pb2, virtual_service_pb2
    from k8s.io.api.core.v1 import core_pb2 as k8s
    from k8s.io.apimachinery.pkg.apis.meta.v1 import meta_pb2 as meta
    from google.protobuf import any_pb2

    gateway = gateway_pb2.Gateway(
        selector={"istio": "ingressgateway"},
        servers=[gateway_pb2.Server(
            port=gateway_pb2.Port(number=80, protocol="HTTP", name="http"),
            hosts=["*"])])
    entry = service_entry_pb2.ServiceEntry(
        hosts=[DETAILS],
        ports=[gateway_pb2.Port(number=9080, protocol="HTTP", name="http")],
        location=service_entry_pb2.ServiceEntry.MESH_INTERNAL,
        resolution=service_entry_pb2.ServiceEntry.STATIC,
        endpoints=[service_entry_pb2.ServiceEntry.Endpoint(
            address="127.0.0.1", ports={"http": 9082}, labels={"app": "details"})])
    route = virtual_service_pb2.VirtualService(
        hosts=[DETAILS],
        http=[virtual_service_pb2.HTTPRoute(route=[virtual_service_pb2.HTTPRouteDestination(
            destination=virtual_service_pb2.Destination(host=DETAILS))])])

    ratings = k8s.ServiceSpec(
        clusterIP="10.96.0.20", selector={"app": "ratings"},
        ports=[k8s.ServicePort(name="http", protocol="TCP", port=9080)])
    endpoints = k8s.Endpoints(
        metadata=meta.ObjectMeta(name="ratings", namespace="bookinfo"),
        subsets=[k8s.EndpointSubset(
            addresses=[k8s.EndpointAddress(
                ip="10.244.0.7", nodeName="node-a",
                targetRef=k8s.ObjectReference(kind="Pod", name="ratings-v1", namespace="bookinfo"))],
            ports=[k8s.EndpointPort(name="http", port=9080, protocol="TCP")])])
    pod = k8s.Pod(
        metadata=meta.ObjectMeta(name="ratings-v1", namespace="bookinfo",
                                 labels={"app": "ratings", "version": "v1"}),
        spec=k8s.PodSpec(serviceAccountName="bookinfo-ratings", nodeName="node-a"))
    node = k8s.NodeSpec(podCIDR="10.244.0.0/24")

    def resource(name, type_name, message, labels=None):
        return mcp_pb2.Resource(
            metadata=mcp_pb2.Metadata(name=name, version="1", labels=labels or {}),
            body=any_pb2.Any(
                type_url=f"type.googleapis.com/{type_name}",
                value=message.SerializeToString()))

    net = "istio.networking.v1alpha3."
    core = "k8s.io.api.core.v1."
    zone = {"topology.kubernetes.io/region": "us-east1",
            "topology.kubernetes.io/zone": "us-east1-b"}
    return {
        NETWORKING + "gateways": [resource("istio-system/ingress", net + "Gateway", gateway)],
        NETWORKING + "serviceentries": [resource("bookinfo/details", net + "ServiceEntry", entry)],
        NETWORKING + "virtualservices": [
            resource("bookinfo/details", net + "VirtualService", route)],
        "k8s/core/v1/services": [
            resource("bookinfo/ratings", core + "ServiceSpec", ratings, {"app": "ratings"})],
        "k8s/core/v1/endpoints": [resource("bookinfo/ratings", core + "Endpoints", endpoints)],
        "k8s/core/v1/pods": [resource("bookinfo/ratings-v1", core + "Pod", pod, pod.metadata.labels)],
        "k8s/core/v1/nodes": [resource("node-a", core + "NodeSpec", node, zone)],
    }


def mcp_source(refuse):
    """A ResourceSource serving `served()`, every other collection empty,
    and ending the stream as Istio 1.1's Galley does for a collection it
    does not serve."""
    from istio.mcp.v1alpha1 import mcp_pb2, mcp_pb2_grpc

    resources = served()
    nonces = itertools.count(1)

    class Source(mcp_pb2_grpc.ResourceSourceServicer):
        def EstablishResourceStream(self, requests, context):
            for request in requests:
                collection = request.collection
                if collection in refuse:
                    say(f"refused {collection}")
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f'unsupported collection "{collection}"')
                if request.response_nonce:
                    verdict = "nack" if request.HasField("error_detail") else "ack"
                    say(f"{verdict} {collection}")
                    continue
                yield mcp_pb2.Resources(
                    system_version_info="1", collection=collection,
                    resources=resources.get(collection, []), nonce=str(next(nonces)))

    serve(lambda s: mcp_pb2_grpc.add_ResourceSourceServicer_to_server(Source(), s))


def mcp_dialing_source(address, refuse):
    """Dials a ResourceSink and serves `served()` as Istio 1.1's Galley does
    with `--sinkAddress`: it opens with a Resources of no collection and
    keeps the stream only if the sink's first message NACKs it with
    UNIMPLEMENTED; a request for a collection in `refuse` ends the stream,
    which names nothing (a client has no status to send). Dials again a
    second later when a stream ends."""
    import queue
    import time
    from istio.mcp.v1alpha1 import mcp_pb2, mcp_pb2_grpc

    resources = served()
    nonces = itertools.count(1)
    stub = mcp_pb2_grpc.ResourceSinkStub(grpc.insecure_channel(address))
    while True:
        outbox = queue.Queue()
        outbox.put(mcp_pb2.Resources(nonce="trigger"))
        call = stub.EstablishResourceStream(iter(outbox.get, None))
        try:
            first = next(call)
            if first.error_detail.code != grpc.StatusCode.UNIMPLEMENTED.value[0]:
                say(f"trigger not nacked: {first}")
                call.cancel()
                time.sleep(1)
                continue
            say("trigger nacked")
            for request in call:
                collection = request.collection
                if collection in refuse:
                    say(f"asked for {collection}, which it does not serve")
                    call.cancel()
                    break
                if request.response_nonce:
                    verdict = "nack" if request.HasField("error_detail") else "ack"
                    say(f"{verdict} {collection}")
                    continue
                outbox.put(mcp_pb2.Resources(
                    system_version_info="1", collection=collection,
                    resources=resources.get(collection, []), nonce=str(next(nonces))))
        except grpc.RpcError as e:
            say(f"stream ended {e.code()}")
        time.sleep(1)


def mcp_limits(address, streams, header_bytes, message_bytes):
    """A sink testing a ResourceSource's limits as grpcio meets them, a
    line per finding: on one channel, `streams` open watches and one more,
    which must wait until one ends (`extra stream waits`, then `extra stream
    served`); requests whose metadata is within `header_bytes` and over it;
    a request over `message_bytes`; then a watch that must still be
    served."""
    import queue
    import threading
    from istio.mcp.v1alpha1 import mcp_pb2, mcp_pb2_grpc

    gateways = NETWORKING + "gateways"
    channel = grpc.insecure_channel(address)
    stub = mcp_pb2_grpc.ResourceSourceStub(channel)

    opened = []

    def close(watches):
        # Each request stream's reader waits on its outbox until told it
        # ended.
        for outbox, call in watches:
            call.cancel()
            outbox.put(None)
        watches.clear()

    def watch(request=None, on=stub, **kwargs):
        outbox = queue.Queue()
        outbox.put(request or mcp_pb2.RequestResources(collection=gateways))
        call = on.EstablishResourceStream(iter(outbox.get, None), timeout=30, **kwargs)
        opened.append((outbox, call))
        return call

    def ended(call):
        try:
            next(call)
            return "served"
        except grpc.RpcError as e:
            return f"{e.code().name}: {e.details()}"

    held = [watch() for _ in range(streams)]
    for call in held:
        next(call)
    extra = watch()
    answered = threading.Event()
    threading.Thread(target=lambda: (next(extra), answered.set()), daemon=True).start()
    # A whole watch on another connection meanwhile (grpcio shares one
    # connection among channels to one address unless told not to): the
    # extra one, on the full connection, still has no answer.
    own = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address, options=own) as other:
        next(watch(on=mcp_pb2_grpc.ResourceSourceStub(other)))
    say("extra stream served over the limit" if answered.is_set() else "extra stream waits")
    held.pop().cancel()
    say("extra stream served" if answered.wait(20) else "extra stream never served")
    close(opened)

    for name, size in (("headers within", header_bytes // 2), ("oversized headers", 2 * header_bytes)):
        say(f"{name} {ended(watch(metadata=[('x-padding', 'x' * size)]))}")

    big = mcp_pb2.RequestResources(collection=gateways, incremental=True)
    for i in range(message_bytes // 16 + 1):
        big.initial_resource_versions[f"ns/gateway-{i}"] = "v1"
    say(f"oversized message {ended(watch(big))}")

    say(f"after {ended(watch())}")
    close(opened)


def xds_server():
    """An ADS server answering every first request for a type with no
    resources, and reporting the ACKs."""
    import ads_pb2
    import ads_pb2_grpc

    nonces = itertools.count(1)

    class Ads(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):
        def StreamAggregatedResources(self, requests, context):
            for request in requests:
                kind = request.type_url.rsplit(".", 1)[-1]
                if request.response_nonce:
                    verdict = "nack" if request.HasField("error_detail") else "ack"
                    say(f"{verdict} {kind}")
                    continue
                yield ads_pb2.DiscoveryResponse(
                    version_info="1", type_url=request.type_url, nonce=str(next(nonces)))

    serve(lambda s: ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(Ads(), s))


ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"


def xds_client(address, node_id, route_name):
    """Asks an ADS server for one route configuration and prints its
    virtual hosts' domains (`route NAME`, then `domain D` lines)."""
    import queue

    import ads_pb2
    import ads_pb2_grpc

    requests = queue.Queue()
    requests.put(ads_pb2.DiscoveryRequest(
        node=ads_pb2.Node(id=node_id), type_url=ROUTES, resource_names=[route_name]))

    def send():
        while True:
            yield requests.get()

    with grpc.insecure_channel(address) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        for response in stub.StreamAggregatedResources(send(), timeout=30):
            requests.put(ads_pb2.DiscoveryRequest(
                node=ads_pb2.Node(id=node_id), type_url=response.type_url,
                resource_names=[route_name], version_info=response.version_info,
                response_nonce=response.nonce))
            if response.type_url != ROUTES or not response.resources:
                continue
            for resource in response.resources:
                config = ads_pb2.RouteConfiguration.FromString(resource.value)
                say(f"route {config.name}")
                for host in config.virtual_hosts:
                    for domain in host.domains:
                        say(f"domain {domain}")
            return


def mixer_check(address, user):
    """A Check as Istio's `mixc check` sends it (no global dictionary:
    every word in the message) for a call to Bookinfo's details by `user`,
    and its referenced attributes read by the message's own words alone, as
    `mixc` reads them (`name` or `name::key`)."""
    from istio.mixer.v1 import attributes_pb2, mixer_pb2, mixer_pb2_grpc

    words = ["destination.service.host", "details.bookinfo.svc.cluster.local",
             "request.headers", "end-user", user]
    attributes = attributes_pb2.CompressedAttributes(
        words=words, strings={-1: -2},
        string_maps={-3: attributes_pb2.StringMap(entries={-4: -5})})
    with grpc.insecure_channel(address) as channel:
        response = mixer_pb2_grpc.MixerStub(channel).Check(
            mixer_pb2.CheckRequest(attributes=attributes, global_word_count=0),
            timeout=10)
    precondition = response.precondition
    referenced = precondition.referenced_attributes

    def word(index):
        if index >= 0:
            sys.exit(f"referenced attribute by global index {index}: "
                     "a client without the dictionary cannot read it")
        return referenced.words[-index - 1]

    names = []
    for match in referenced.attribute_matches:
        name = word(match.name)
        names.append(f"{name}::{word(match.map_key)}" if match.map_key else name)
    say(f"status {precondition.status.code} {precondition.status.message}")
    for name in sorted(names):
        say(f"referenced {name}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("proto_dir")
    parser.add_argument("out_dir")
    roles = parser.add_subparsers(dest="role", required=True)
    source = roles.add_parser("mcp-source")
    source.add_argument("--refuse", action="append", default=[])
    dialing = roles.add_parser("mcp-dialing-source")
    dialing.add_argument("address")
    dialing.add_argument("--refuse", action="append", default=[])
    limits = roles.add_parser("mcp-limits")
    limits.add_argument("address")
    limits.add_argument("--streams", type=int, required=True)
    limits.add_argument("--header-bytes", type=int, required=True)
    limits.add_argument("--message-bytes", type=int, required=True)
    roles.add_parser("xds-server")
    client = roles.add_parser("xds-client")
    client.add_argument("address")
    client.add_argument("node_id")
    client.add_argument("route_name")
    check = roles.add_parser("mixer-check")
    check.add_argument("address")
    check.add_argument("user")
    args = parser.parse_args()
    generate(args.proto_dir, args.out_dir)
    if args.role == "mcp-source":
        mcp_source(set(args.refuse))
    elif args.role == "mcp-dialing-source":
        mcp_dialing_source(args.address, set(args.refuse))
    elif args.role == "mcp-limits":
        mcp_limits(args.address, args.streams, args.header_bytes, args.message_bytes)
    elif args.role == "xds-server":
        xds_server()
    elif args.role == "xds-client":
        xds_client(args.address, args.node_id, args.route_name)
    else:
        mixer_check(args.address, args.user)


if __name__ == "__main__":
    main()
