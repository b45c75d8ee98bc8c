"""Black-box access to a model: a client for prediction APIs (``client``), and a small server that offers one
(``server``, serving what ``served`` loads).

The client sends images as FP32 pixels in [0, 1] (times ``pixel_max``), NCHW, in batches, and collects top-1
labels through the Open Inference Protocol v2 (KServe, Triton, MLServer) or a plain JSON endpoint whose field
names are configurable (KServe v1 / TF Serving ``instances`` -> ``predictions`` by default). A query either
returns one label per image or raises ``InputError``: a partial answer is never evidence.

The server answers the same protocols for a ticket or a model file, standardising pixels with the training
data's channel statistics, so a suspect-like service stands up on loopback in one command.

Neither side trusts its peer: the client gives each request and the whole query a deadline, caps its retries
and reads at most a few KiB per image of an answer; the server caps the body, the batch, the time a request
may take to arrive and the number of open connections (``ServerLimits``), and answers every refusal in JSON.
"""

from ticketguard.verification.blackbox.client import PROTOCOLS, Endpoint, query_labels
from ticketguard.verification.blackbox.served import ServedModel, load_served_model, ticket_normalization
from ticketguard.verification.blackbox.server import ModelServer, ServerLimits

__all__ = [
    "PROTOCOLS", "Endpoint", "ModelServer", "ServedModel", "ServerLimits", "load_served_model", "query_labels",
    "ticket_normalization",
]
