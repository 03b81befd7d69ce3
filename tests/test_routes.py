"""Route table: default deny, built-in routes, config routes, and refusal of ambiguous paths."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from guard_agent.policy import PolicyError, parse_policy
from guard_agent.routes import MAX_PATH_LENGTH, RouteTable, check_path
from guard_agent.settings import AllowedRoute, ConfigError, CustomRoute

TABLE = RouteTable()


class TestBuiltinRoutes:
    @pytest.mark.parametrize(
        ("method", "path", "protocol", "model", "version", "route"),
        [
            ("POST", "/v2/models/mnist/infer", "v2", "mnist", None, "v2.infer"),
            ("POST", "/v2/models/mnist/versions/3/infer", "v2", "mnist", "3", "v2.infer"),
            ("POST", "/v2/models/my_model-1.0/infer", "v2", "my_model-1.0", None, "v2.infer"),
            ("POST", "/v1/models/mnist:predict", "v1", "mnist", None, "v1.predict"),
            ("POST", "/v1/models/mnist/versions/2:predict", "v1", "mnist", "2", "v1.predict"),
            ("POST", "/invocations", "mlflow", None, None, "mlflow.invocations"),
            ("POST", "/v2/models/mnist/infer?timeout=3", "v2", "mnist", None, "v2.infer"),
        ],
    )
    def test_inference_routes(self, method: str, path: str, protocol: str, model: str | None,
                              version: str | None, route: str) -> None:
        """Scored routes are recognised with protocol, model, version and a low-cardinality label."""
        m = TABLE.match(method, path)
        got = (m.kind, m.protocol, m.model, m.version, m.route)
        assert got == ("inference", protocol, model, version, route)

    @pytest.mark.parametrize("method", ["GET", "HEAD"])
    @pytest.mark.parametrize(
        ("path", "route"),
        [
            ("/v2", "v2.server_metadata"),
            ("/v2/health/live", "v2.health"),
            ("/v2/health/ready", "v2.health"),
            ("/v2/models/mnist", "v2.model_metadata"),
            ("/v2/models/mnist/ready", "v2.model_ready"),
            ("/v2/models/mnist/versions/1", "v2.model_metadata"),
            ("/v2/models/mnist/versions/1/ready", "v2.model_ready"),
            ("/v1/models/mnist", "v1.model_status"),
            ("/v1/models/mnist/versions/1", "v1.model_status"),
            ("/v1/models/mnist/metadata", "v1.model_metadata"),
            ("/ping", "mlflow.ping"),
            ("/health", "health"),
        ],
    )
    def test_passthrough_routes(self, method: str, path: str, route: str) -> None:
        """Read-only health and metadata routes pass through unscored for GET and HEAD."""
        m = TABLE.match(method, path)
        assert (m.kind, m.route, m.protocol) == ("passthrough", route, None)

    @pytest.mark.parametrize(
        ("method", "path", "reason"),
        [
            ("POST", "/v2/repository/models/x/unload", "route not allowed"),
            ("POST", "/v2/repository/models/x/load", "route not allowed"),
            ("GET", "/v2/repository/index", "route not allowed"),
            ("POST", "/v2/repository/index", "route not allowed"),
            ("GET", "/v2/models/m/infer", "method not allowed"),
            ("PUT", "/v2/models/m/infer", "method not allowed"),
            ("post", "/v2/models/m/infer", "method not allowed"),
            ("POST", "/v2/models/m/ready", "method not allowed"),
            ("DELETE", "/v2/models/m", "method not allowed"),
            ("GET", "/invocations", "method not allowed"),
            ("POST", "/ping", "method not allowed"),
            ("GET", "/v1/models/m:predict", "method not allowed"),
            ("POST", "/v2/models/m/infer/", "route not allowed"),
            ("POST", "/V2/models/m/infer", "route not allowed"),
            ("POST", "/v2/Models/m/infer", "route not allowed"),
            ("POST", "/v2/models/m/INFER", "route not allowed"),
            ("POST", "/invocations/", "route not allowed"),
            ("POST", "/v1/models/m:explain", "route not allowed"),
            ("POST", "/v2/models/m/generate", "route not allowed"),
            ("GET", "/v2/models/m/metadata", "route not allowed"),
            ("GET", "/", "route not allowed"),
            ("GET", "/metrics", "route not allowed"),
            ("POST", "/v2/models//infer", "route not allowed"),
        ],
    )
    def test_everything_else_is_denied(self, method: str, path: str, reason: str) -> None:
        """Unknown routes, wrong methods, case variants and trailing slashes are denied with a reason."""
        m = TABLE.match(method, path)
        assert m.kind in ("denied", "invalid")
        if m.kind == "denied":
            assert reason in m.reason
            assert m.route == "denied"


class TestAmbiguousPaths:
    @pytest.mark.parametrize(
        ("path", "why"),
        [
            ("/v2/models/m/%69nfer", "percent-encoding"),
            ("/v2/models/m%2Finfer", "percent-encoding"),
            ("/v2/models/m%2finfer", "percent-encoding"),
            ("/v2/models/%2e%2e/infer", "percent-encoding"),
            ("/v2/models/m/../../repository/x/unload", "'..'"),
            ("/v2/models/m/./infer", "'.'"),
            ("/v2/models/m/infer/..", "'..'"),
            ("/./v2/models/m/infer", "'.'"),
            ("/v2//models/m/infer", "'//'"),
            ("//v2/models/m/infer", "'//'"),
            ("/v2/models/m\\infer", "backslash"),
            ("/v2/models/m/infer;x=1", "';'"),
            ("/v2/models/m/..;/infer", "';'"),
            ("/v2/models/m/infer\x00", "control"),
            ("/v2/models/m/infer\r\n", "control"),
            ("/v2/models/m\t/infer", "control"),
            ("/v2/models/mé/infer", "non-ASCII"),
            ("/v2/models/m/infer#x", "not allowed"),
            ("/v2/models/m infer", "not allowed"),
            ("v2/models/m/infer", "absolute path"),
            ("http://evil/v2/models/m/infer", "absolute path"),
            ("*", "absolute path"),
            ("", "absolute path"),
            ("/v2/models/" + "a" * MAX_PATH_LENGTH + "/infer", "longer than"),
        ],
    )
    def test_invalid_forms(self, path: str, why: str) -> None:
        """Every ambiguous spelling is 'invalid' (never routed) and the reason names the problem."""
        m = TABLE.match("POST", path)
        assert m.kind == "invalid"
        assert why in m.reason
        assert m.route == "invalid"

    @pytest.mark.parametrize(
        "path", ["/v2/models/../infer", "/v2/models/./ready", "/v1/models/..:predict", "/v1/models/.:predict",
                 "/v2/models/m/versions/../infer"],
    )
    def test_dot_names_are_invalid(self, path: str) -> None:
        """'.' and '..' are never accepted as a model or version name."""
        assert TABLE.match("POST", path).kind == "invalid"

    def test_query_string_is_not_part_of_the_path(self) -> None:
        """A '%' or '..' in the query does not make the path ambiguous; the path alone is routed."""
        m = TABLE.match("POST", "/v2/models/m/infer?x=%2F..%00")
        assert m.kind == "inference"

    def test_model_name_length_limit(self) -> None:
        """Model names are 1 to 128 characters; longer ones are not routed."""
        assert TABLE.match("POST", f"/v2/models/{'a' * 128}/infer").kind == "inference"
        assert TABLE.match("POST", f"/v2/models/{'a' * 129}/infer").kind == "denied"

    def test_check_path_accepts_plain_paths(self) -> None:
        """A plain path has no problem; a bad one gets a reason string."""
        assert check_path("/v2/models/m/infer") is None
        assert check_path("/") is None
        assert check_path("/a/%41") is not None


class TestConfigRoutes:
    def test_custom_route_is_scored_with_its_pointer(self) -> None:
        """A custom route matches its exact path and method and carries pointer and model."""
        t = RouteTable(custom=[CustomRoute(path="/score", pointer="/data/x", model="fraud")])
        m = t.match("POST", "/score")
        assert (m.kind, m.protocol, m.pointer, m.model, m.route) == (
            "inference", "custom", "/data/x", "fraud", "custom:/score")
        assert t.match("GET", "/score").reason == "method not allowed for this route"
        assert t.match("POST", "/score/").kind == "denied"
        assert t.match("POST", "/Score").kind == "denied"

    def test_custom_route_takes_precedence(self) -> None:
        """A custom route on a built-in path wins (the operator declared how to read it)."""
        t = RouteTable(custom=[CustomRoute(path="/invocations", pointer="/x")])
        assert t.match("POST", "/invocations").protocol == "custom"

    def test_allowed_exact_route(self) -> None:
        """An allowed route passes through for its method only."""
        t = RouteTable(allowed=[AllowedRoute(path="/v2/repository/index", method="POST")])
        m = t.match("POST", "/v2/repository/index")
        assert (m.kind, m.route) == ("passthrough", "allowed:/v2/repository/index")
        assert t.match("GET", "/v2/repository/index").kind == "denied"

    def test_allowed_wildcard_matches_one_segment(self) -> None:
        """A trailing '*' matches exactly one further non-empty segment."""
        t = RouteTable(allowed=[AllowedRoute(path="/v2/repository/models/*", method="GET")])
        assert t.match("GET", "/v2/repository/models/m").kind == "passthrough"
        assert t.match("GET", "/v2/repository/models/m/load").kind == "denied"
        assert t.match("GET", "/v2/repository/models/").kind == "denied"
        assert t.match("POST", "/v2/repository/models/m").kind == "denied"
        assert t.match("GET", "/v2/repository/models/%2e%2e").kind == "invalid"

    def test_wildcard_never_shadows_inference(self) -> None:
        """A wildcard cannot turn a scored route into an unscored one."""
        t = RouteTable(allowed=[AllowedRoute(path="/v2/models/m/*", method="POST")])
        assert t.match("POST", "/v2/models/m/infer").kind == "inference"
        assert t.match("POST", "/v2/models/m/load").kind == "passthrough"

    def test_allowed_method_on_builtin_path(self) -> None:
        """An extra method on a read-only path can be allowed without changing the built-in ones."""
        t = RouteTable(allowed=[AllowedRoute(path="/v2/models/m", method="DELETE")])
        assert t.match("DELETE", "/v2/models/m").kind == "passthrough"
        assert t.match("GET", "/v2/models/m").route == "v2.model_metadata"

    @pytest.mark.parametrize(
        "route",
        [AllowedRoute(path="/v2/models/m/infer", method="POST"), AllowedRoute(path="/v2/models/m/infer"),
         AllowedRoute(path="/invocations", method="POST"), AllowedRoute(path="/v1/models/m:predict"),
         AllowedRoute(path="/v2/health/live")],
    )
    def test_allowed_route_cannot_shadow_builtin(self, route: AllowedRoute) -> None:
        """Allowing an inference path (any method) or a built-in read route is a config error."""
        with pytest.raises(ConfigError, match="built-in route"):
            RouteTable(allowed=[route])

    @pytest.mark.parametrize("path", ["/a/../b", "/a//b", "/a/%2F", "a", "/a/", "/a\\b", "/a;b"])
    def test_bad_config_paths_are_refused(self, path: str) -> None:
        """Config paths must be plain absolute paths, else they could never match or could mislead."""
        with pytest.raises(ConfigError, match="not a plain absolute path"):
            RouteTable(custom=[CustomRoute(path=path, pointer="/x")])
        with pytest.raises(ConfigError, match="not a plain absolute path"):
            RouteTable(allowed=[AllowedRoute(path=path)])

    def test_custom_pointer_must_start_with_slash(self) -> None:
        """A custom route's pointer must be a JSON pointer."""
        with pytest.raises(ConfigError, match="pointer"):
            RouteTable(custom=[CustomRoute(path="/score", pointer="x")])


HARDEN = """version: 1
mode: enforce
rules:
  - id: extraction
    when: {request.rows: {gte: 100}}
    action: harden
"""


class TestHardeningOnCustomRoutes:
    def test_harden_rule_over_a_custom_route_is_refused(self) -> None:
        """An enforced rule that may answer 'harden' while a custom route exists is refused, naming the rule,
        the route and the way out: a custom route's answer cannot be hardened (it would always be a 502)."""
        table = RouteTable(custom=[CustomRoute(path="/score", pointer="/x")])
        with pytest.raises(PolicyError, match=r"rules: rule\(s\) 'extraction' may answer 'harden'.*POST /score"):
            table.check_policy(parse_policy(HARDEN).policy)

    @pytest.mark.parametrize("policy", [
        HARDEN.replace("mode: enforce", "mode: monitor"),
        HARDEN.replace("action: harden", "action: flag"),
        HARDEN + "models:\n  fraud: {disable_rules: [extraction]}\n",
        HARDEN + "models:\n  fraud: {mode: monitor}\n",
    ], ids=["monitor", "flag", "disabled-for-the-model", "model-in-monitor"])
    def test_policies_that_cannot_harden_there_are_accepted(self, policy: str) -> None:
        """Monitor mode, other actions, or a per-model override that drops the rule for the route's model pass."""
        RouteTable(custom=[CustomRoute(path="/score", pointer="/x", model="fraud")]).check_policy(
            parse_policy(policy).policy)

    def test_override_that_adds_harden_for_the_route_model_is_refused(self) -> None:
        """A per-model override that adds a harden rule for the custom route's model is refused, at its field."""
        policy = "version: 1\nmodels:\n  fraud:\n    rules:\n      - id: h\n        when: {request.rows: {gte: 1}}\n" \
                 "        action: harden\n"
        table = RouteTable(custom=[CustomRoute(path="/score", pointer="/x", model="fraud")])
        with pytest.raises(PolicyError, match=r"models\.fraud\.rules: rule\(s\) 'h'"):
            table.check_policy(parse_policy(policy).policy)
        RouteTable(custom=[CustomRoute(path="/score", pointer="/x", model="other")]).check_policy(
            parse_policy(policy).policy)

    def test_builtin_routes_can_be_hardened(self) -> None:
        """Without custom routes a harden rule is fine: v2, v1 and MLflow answers can be rewritten."""
        RouteTable().check_policy(parse_policy(HARDEN).policy)


class TestProperties:
    @settings(max_examples=400, deadline=None)
    @given(method=st.sampled_from(["GET", "POST", "HEAD", "PUT"]), path=st.text(max_size=80))
    def test_arbitrary_targets_never_raise(self, method: str, path: str) -> None:
        """Any string target gets a RouteMatch; only well-formed paths are ever routed."""
        m = TABLE.match(method, path)
        assert m.kind in ("inference", "passthrough", "denied", "invalid")
        if m.kind in ("inference", "passthrough"):
            target = path.partition("?")[0]
            assert check_path(target) is None
            assert "%" not in target
            assert "//" not in target
            assert not {".", ".."} & set(target.split("/"))

    @settings(max_examples=200, deadline=None)
    @given(name=st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,20}", fullmatch=True))
    def test_any_valid_model_name_routes(self, name: str) -> None:
        """Every name in the documented alphabet routes to inference with that exact model name."""
        m = TABLE.match("POST", f"/v2/models/{name}/infer")
        assert m.kind == "inference"
        assert m.model == name


class TestMatchCache:
    def test_cached_answers_equal_fresh_ones_and_stay_bounded(self) -> None:
        """Asked twice (the second answer from the cache) or after the cache emptied, every target gets the same
        answer as a table that never saw it; ever new paths never hold more than the bound."""
        from guard_agent import routes as routes_module

        paths = ["/v2/models/m/infer", "/v2/models/m/versions/1/infer", "/v1/models/m:predict", "/invocations",
                 "/v2/health/ready", "/v2/models/m", "/v2/repository/models/m/unload", "/v2/models/../infer",
                 "/v2/models/m/infer?x=1", "/V2/models/m/infer", "/v2/models/m/infer/", "//v2", "/ping"]
        table = RouteTable()
        for method in ("GET", "POST", "HEAD"):
            for path in paths:
                first, second = table.match(method, path), table.match(method, path)
                assert first == second == RouteTable().match(method, path)
        for i in range(routes_module._MATCH_CACHE_ENTRIES + 10):
            table.match("POST", f"/v2/models/m{i}/infer")
        assert len(table._matches) <= routes_module._MATCH_CACHE_ENTRIES
        assert table.match("POST", "/v2/models/m/infer") == RouteTable().match("POST", "/v2/models/m/infer")
