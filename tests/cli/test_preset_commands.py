"""`fastrlhf grpo` and the other algorithm commands fix the algorithm: asking one for another
algorithm says so and names the command that runs it (never "did you mean --algo?")."""
import pytest

from fastrlhf import cli


@pytest.mark.parametrize("argv", [["grpo", "--algo", "ppo"], ["grpo", "--algo=rloo"], ["rloo", "--algo", "ppo"]])
def test_an_algorithm_command_asked_for_another_algorithm_names_the_right_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "did you mean" not in err, err
    wanted = argv[1].partition("=")[2] or argv[2]
    assert f"`fastrlhf {argv[0]}` runs --algo {argv[0]}" in err and f"`fastrlhf ppo --algo {wanted}" in err, err
