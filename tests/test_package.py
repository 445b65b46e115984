"""The package surface without torch: the functional API works and the torch names fail with a
message that says what to install."""
import subprocess
import sys
import textwrap


def test_torch_names_without_torch_say_what_is_missing():
    # None in sys.modules makes `import torch` fail as if torch were not installed.
    script = textwrap.dedent("""
        import sys
        sys.modules["torch"] = None
        import numpy as np
        import cpeft
        from cpeft import functional as F
        y, _ = F.lora_linear_forward(np.ones((2, 3)), np.ones((4, 3)), None, np.ones((1, 3)),
                                     np.ones((4, 1)), 0.5)
        assert y.shape == (2, 4) and float(y[0, 0]) == 4.5, y
        for name in ("Linear", "LoraConfig", "get_peft_model"):
            try:
                getattr(cpeft, name)
            except ModuleNotFoundError as error:
                assert "needs PyTorch" in str(error) and error.name == "torch", error
            else:
                raise AssertionError(name + " resolved without torch")
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
