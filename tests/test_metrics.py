"""Metric name templates: a name built from a template reads back to its numbers, and only from its own template."""

from lunaris import metrics


def test_templated_names_read_back_their_numbers():
    name = metrics.EXPERT_UTIL.format(layer=3, expert=12)
    assert name == "experts/util_layer3/e12"
    assert metrics.match(metrics.EXPERT_UTIL, name) == {"layer": 3, "expert": 12}
    assert metrics.match(metrics.IRL_UPDATE_COSINE, metrics.IRL_UPDATE_COSINE.format(step=2)) == {"step": 2}
    assert metrics.match(metrics.DROP_RATE, "experts/drop_rate_layer") is None
    assert metrics.match(metrics.IRL_GRAD_NORM, metrics.IRL_UPDATE_NORM.format(step=1)) is None


def test_template_of_finds_the_template_a_name_came_from():
    assert metrics.template_of("experts/router_entropy_layer0") == metrics.ROUTER_ENTROPY
    assert metrics.template_of("irl/update_norm_step4") == metrics.IRL_UPDATE_NORM
    assert metrics.template_of("loss/total") is None
