"""An exact, bounded calculator tool (+ - * / // ** % and parentheses).

The expression is parsed with `ast` and only arithmetic nodes are evaluated, on `Fraction`s, so
"0.1+0.2" is exactly 0.3 and nothing is ever passed to `eval`. Every literal, exponent and
intermediate result is size-checked, so hostile input such as "9**9**9" fails at once instead of
hanging the rollout. Bad input returns a one-line string starting with "Error: ".
"""
from __future__ import annotations

import ast
import operator
from decimal import Decimal, InvalidOperation
from fractions import Fraction

MAX_LENGTH = 200  # characters of input
MAX_EXPONENT = 64  # |n| in a ** n
MAX_VALUE = 10**30  # bound on |numerator| and denominator of every value
DECIMALS = 12  # decimal places shown for a non-integer result

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.Mod: operator.mod,
    ast.FloorDiv: operator.floordiv,  # GSM8K's annotations use it ("560//10")
}
_SYMBOLS = {"×": "*", "x": "*", "X": "*", "÷": "/", "−": "-"}


class _CalcError(Exception):
    """A user-facing reason the expression cannot be computed."""


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: + - * / ** % and parentheses on numbers.

    Args:
        expression: The arithmetic expression to evaluate, e.g. "48 / 2".
    """
    try:
        return _format(_evaluate(expression))
    except _CalcError as e:
        return f"Error: {e}"
    except ZeroDivisionError:
        return "Error: division by zero"
    except (RecursionError, MemoryError, OverflowError):
        return "Error: expression too large"
    except Exception as e:  # never raise into the rollout loop
        return f"Error: {type(e).__name__}"


def _evaluate(expression) -> Fraction:
    if not isinstance(expression, str):
        raise _CalcError(f"expression must be a string, got {type(expression).__name__}")
    text = expression.strip()
    if not text:
        raise _CalcError("empty expression")
    if len(text) > MAX_LENGTH:
        raise _CalcError(f"expression longer than {MAX_LENGTH} characters")
    for symbol, replacement in _SYMBOLS.items():
        text = text.replace(symbol, replacement)
    if "," in text:
        raise _CalcError("commas are not allowed; write 1234, not 1,234")
    if "^" in text:
        raise _CalcError("use ** for powers, not ^")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise _CalcError(f"invalid expression: {' '.join(expression.split())[:60]}") from None
    return _eval_node(tree.body, text)


def _eval_node(node: ast.AST, source: str) -> Fraction:
    if isinstance(node, ast.Constant):
        if type(node.value) not in (int, float):
            raise _CalcError(f"not a number: {node.value!r}"[:80])
        return _literal(ast.get_source_segment(source, node) or repr(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval_node(node.operand, source)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        return _check(_power(_eval_node(node.left, source), _eval_node(node.right, source)))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = _eval_node(node.left, source), _eval_node(node.right, source)
        return _check(Fraction(_BINOPS[type(node.op)](left, right)))
    if isinstance(node, ast.BinOp):
        raise _CalcError(f"unsupported operator {type(node.op).__name__}; use + - * / // ** %")
    if isinstance(node, ast.Name):
        raise _CalcError(f"unknown name '{node.id}'; only numbers and + - * / ** % ( ) are allowed")
    if isinstance(node, ast.Call):
        raise _CalcError("function calls are not allowed; only numbers and + - * / ** % ( )")
    raise _CalcError(f"unsupported syntax: {type(node).__name__}")


def _literal(text: str) -> Fraction:
    """A decimal literal as an exact Fraction (0.1 is 1/10, not the nearest float)."""
    try:
        if "_" in text:
            raise InvalidOperation
        number = Decimal(text)
    except InvalidOperation:
        raise _CalcError(f"not a number: {text[:40]}") from None
    if not number.is_finite() or number != 0 and abs(number.adjusted()) > 30:
        raise _CalcError(f"number out of range: {text[:40]}")
    return _check(Fraction(number))


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator != 1:
        return _root(base, exponent)
    if base in (0, 1, -1):
        return base**exponent  # cheap for any exponent; 0 ** -1 raises ZeroDivisionError
    if abs(exponent) > MAX_EXPONENT:
        raise _CalcError(f"exponent larger than {MAX_EXPONENT}")
    return base**exponent.numerator


def _root(base: Fraction, exponent: Fraction) -> Fraction:
    """base ** (p/q) when the result is rational, e.g. 16 ** 0.5 = 4; else an error."""
    p, q = exponent.numerator, exponent.denominator
    if q > MAX_EXPONENT or base < 0:
        raise _CalcError("result is not a rational number")
    num, den = _int_root(base.numerator, q), _int_root(base.denominator, q)
    if num is None or den is None:
        raise _CalcError("result is not a rational number")
    return _power(Fraction(num, den), Fraction(p))


def _int_root(n: int, q: int) -> int | None:
    """The exact integer q-th root of n >= 0, or None."""
    guess = round(n ** (1.0 / q))
    for r in (guess - 1, guess, guess + 1):
        if r >= 0 and r**q == n:
            return r
    return None


def _check(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_VALUE or value.denominator > MAX_VALUE:
        raise _CalcError("result too large")
    return value


def _format(value: Fraction) -> str:
    """'24' for integers, else a decimal with at most 12 places and no trailing zeros."""
    if value.denominator == 1:
        return str(value.numerator)
    rounded = round(value, DECIMALS)
    if rounded == 0:  # too small for fixed notation: 12 significant digits instead
        return format(Decimal(value.numerator) / Decimal(value.denominator), f".{DECIMALS}g").lower()
    sign = "-" if rounded < 0 else ""
    scaled = abs(rounded.numerator) * 10**DECIMALS // rounded.denominator
    whole, frac = divmod(scaled, 10**DECIMALS)
    frac_text = str(frac).rjust(DECIMALS, "0").rstrip("0")
    return f"{sign}{whole}.{frac_text}" if frac_text else f"{sign}{whole}"
