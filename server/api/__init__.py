"""The HTTP API: one module per endpoint family, each a thin handler over the parts below it.

Holds the completion pipeline (`completions`) and each request's lifecycle (`lifecycle`), the responses that
end it (`responses`), explain (`explain`), feedback (`feedback`), admin (`admin`), probes (`probes`); request
body reading (`body`), protocol models (`protocol`, `prompts`), input limits (`input_limits`), the request-id
middleware and the OpenAPI description (`openapi`, `openapi_models`). May import every part below it: `gateway`,
`snapshot`, `quota`, `policy`, `upstream`, `telemetry`, `store`, `config`, `errors`, `outcome`.
"""
