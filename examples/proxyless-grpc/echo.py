"""A gRPC echo server and a client, for testing xDS-driven (proxyless) gRPC.

server PORT       serves /mesh.test.Echo/Say, answering with the request bytes
client TARGET     calls it once through TARGET (an xds:/// target reads
                  GRPC_XDS_BOOTSTRAP) and prints the answer
"""
import sys
from concurrent import futures

import grpc


def serve(port):
    def say(request, context):
        return b"echo:" + request

    handler = grpc.method_handlers_generic_handler(
        "mesh.test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("serving", flush=True)
    server.wait_for_termination()


def call(target):
    with grpc.insecure_channel(target) as channel:
        say = channel.unary_unary("/mesh.test.Echo/Say")
        print(say(b"hello", timeout=20).decode(), flush=True)


if __name__ == "__main__":
    {"server": serve, "client": call}[sys.argv[1]](sys.argv[2])
