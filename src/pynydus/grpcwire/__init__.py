"""gRPC over HTTP/2 on a socket, for a service handed in as a method table.

``rpc``         Method, RpcAbort, status codes: the interface to a service
``connection``  sans-I/O HTTP/2 server connection with gRPC framing (bytes in, events out)
``hpackin``     HPACK decoding of request headers (``_hpack``: the hpack package's pieces)
``server``      sockets and threads: accept, read, dispatch to workers, graceful stop

Nothing here knows what the service is (the snapshotter's is ``snapshot/service.py``).
"""
