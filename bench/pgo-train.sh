#!/usr/bin/env bash
# The training run for bench/pgo.sh: drive an instrumented Portico with a mix of
# traffic (plain proxying over HTTP/1.1 and h2c, header transforms and CORS on a
# route with a {param} rewrite, key-auth with a rate limit, 401s, small POST bodies,
# access log on), so the optimized build is tuned for the gateway's usual paths, not
# for the benchmark's single request.
#   bash bench/pgo-train.sh PORTICO_BIN UPSTREAM_BIN
set -euo pipefail
BIN="$1"; UPBIN="$2"
W=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$W"' EXIT
"$UPBIN" 127.0.0.1:19710 >/dev/null 2>&1 &
cat > "$W/p.yaml" <<YAML
listen: ["127.0.0.1:19700"]
admin: {listen: "127.0.0.1:19701"}
workers: 1
access_log: {enabled: true, path: "$W/access.log"}
store: {path: "$W/p.db"}
consumers:
  - name: alice
    credentials: [{type: key-auth, key: "pk_train_alice_0123456789"}]
upstreams:
  hello: {targets: [{url: "http://127.0.0.1:19710"}]}
routes:
  - {name: plain, paths: ["/*"], upstream: hello}
  - name: users
    paths: ["/users/{id}"]
    methods: [GET, POST]
    upstream: hello
    rewrite: "/v2/users/{id}"
    plugins:
      request-transformer: {headers: {add: {x-user-id: "\${param.id}"}, set: {x-gateway: portico}}}
      response-transformer: {headers: {remove: [server], set: {x-served-by: "\${route.name}"}}}
      cors: {origins: ["https://app.example.com"]}
  - name: orders
    paths: ["/orders/*"]
    upstream: hello
    plugins:
      key-auth: {}
      rate-limit: {limits: [{requests: 1000000000, per: 1s}]}
YAML
"$BIN" run --config "$W/p.yaml" >"$W/out.log" 2>&1 &
P=$!
for _ in $(seq 100); do curl -s -o /dev/null http://127.0.0.1:19700/ && break; sleep 0.2; done
expect() { # status URL [curl args...]: the training traffic must be what it claims
    local want=$1 url=$2 got
    shift 2
    got=$(curl -s -o /dev/null -w '%{http_code}' "$@" "$url")
    [[ "$got" == "$want" ]] || { echo "pgo-train: $url answered $got, not $want" >&2; tail -5 "$W/out.log" >&2; exit 1; }
}
expect 200 http://127.0.0.1:19700/
expect 200 http://127.0.0.1:19700/users/42
expect 200 http://127.0.0.1:19700/orders/7 -H 'apikey: pk_train_alice_0123456789'
expect 401 http://127.0.0.1:19700/orders/1
expect 200 http://127.0.0.1:19700/static/x --http2-prior-knowledge
wrk -t1 -c50 -d8s http://127.0.0.1:19700/ >/dev/null
h2load --h1 -n 50000 -c 10 -H 'User-Agent: train/1.0' -H 'Accept: */*' http://127.0.0.1:19700/users/42 >/dev/null
h2load --h1 -n 30000 -c 10 -H 'apikey: pk_train_alice_0123456789' http://127.0.0.1:19700/orders/7 >/dev/null
h2load -n 30000 -c 10 -m 10 http://127.0.0.1:19700/static/x >/dev/null
h2load --h1 -n 5000 -c 5 http://127.0.0.1:19700/orders/1 >/dev/null # 401s
for i in $(seq 200); do curl -s -o /dev/null -X POST -d 'hello=world' http://127.0.0.1:19700/users/$i; done
kill -TERM $P; wait $P || true
echo "trained: $(wc -l < "$W/access.log") requests logged"
