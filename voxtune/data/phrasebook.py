"""Sentences the synthesiser speaks, in 24 languages: templates around numbers, and runs of
real words from Faker's per-language word lists where it ships one.

Numbers are what makes the templates cheap to vary and easy to check: every instruction has an
exact answer. Templates avoid grammar that changes with the number (no "n apples"), so any
number fits. Numbers are written as words where num2words knows the language (the transcript
is then what is heard), else as digits, which the voice reads in that language.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cache

import numpy as np
from num2words import CONVERTER_CLASSES as _NUM2WORDS_LANGUAGES
from num2words import num2words


@dataclass(frozen=True)
class Phrases:
    """One language's templates. `list_sep` joins the items of a repeat-after-me list."""

    statement: str  # {n}
    question: str  # {n}
    command: str  # {n}
    add: str  # {a} {b}
    compare: str  # {a} {b}
    repeat: str  # {items}
    list_sep: str = ", "
    count: str | None = None  # {a} {b}; only where the number words need no case ending
    spell: str | None = None  # {word}; alphabetic scripts with a word list
    facts: tuple[str, ...] | None = None  # questions whose answers are FACT_ANSWERS, in order


# Answers of `Phrases.facts`: days in a week, months in a year, hours in a day, minutes in an
# hour, legs of a spider.
FACT_ANSWERS = (7, 12, 24, 60, 8)


PHRASEBOOK: dict[str, Phrases] = {
    "en": Phrases(
        "The number is {n}.",
        "Is the number {n}?",
        "Write down the number {n}.",
        "What is {a} plus {b}?",
        "Which is bigger, {a} or {b}?",
        "Repeat after me: {items}.",
    ),
    "de": Phrases(
        "Die Zahl ist {n}.",
        "Ist die Zahl {n}?",
        "Schreib die Zahl {n} auf.",
        "Was ist {a} plus {b}?",
        "Was ist größer, {a} oder {b}?",
        "Sprich mir nach: {items}.",
    ),
    "fr": Phrases(
        "Le nombre est {n}.",
        "Le nombre est-il {n} ?",
        "Écris le nombre {n}.",
        "Combien font {a} plus {b} ?",
        "Lequel est le plus grand, {a} ou {b} ?",
        "Répète après moi : {items}.",
    ),
    "es": Phrases(
        "El número es {n}.",
        "¿El número es {n}?",
        "Escribe el número {n}.",
        "¿Cuánto es {a} más {b}?",
        "¿Cuál es mayor, {a} o {b}?",
        "Repite después de mí: {items}.",
    ),
    "it": Phrases(
        "Il numero è {n}.",
        "Il numero è {n}?",
        "Scrivi il numero {n}.",
        "Quanto fa {a} più {b}?",
        "Quale è più grande, {a} o {b}?",
        "Ripeti dopo di me: {items}.",
    ),
    "pt": Phrases(
        "O número é {n}.",
        "O número é {n}?",
        "Escreva o número {n}.",
        "Quanto é {a} mais {b}?",
        "Qual é maior, {a} ou {b}?",
        "Repita comigo: {items}.",
    ),
    "nl": Phrases(
        "Het getal is {n}.",
        "Is het getal {n}?",
        "Schrijf het getal {n} op.",
        "Hoeveel is {a} plus {b}?",
        "Wat is groter, {a} of {b}?",
        "Zeg me na: {items}.",
    ),
    "sv": Phrases(
        "Talet är {n}.",
        "Är talet {n}?",
        "Skriv ner talet {n}.",
        "Vad är {a} plus {b}?",
        "Vilket är störst, {a} eller {b}?",
        "Upprepa efter mig: {items}.",
    ),
    "da": Phrases(
        "Tallet er {n}.",
        "Er tallet {n}?",
        "Skriv tallet {n} ned.",
        "Hvad er {a} plus {b}?",
        "Hvilket er størst, {a} eller {b}?",
        "Gentag efter mig: {items}.",
    ),
    "nb": Phrases(
        "Tallet er {n}.",
        "Er tallet {n}?",
        "Skriv ned tallet {n}.",
        "Hva er {a} pluss {b}?",
        "Hvilket er størst, {a} eller {b}?",
        "Gjenta etter meg: {items}.",
    ),
    "fi": Phrases(
        "Luku on {n}.",
        "Onko luku {n}?",
        "Kirjoita luku {n}.",
        "Paljonko on {a} plus {b}?",
        "Kumpi on suurempi, {a} vai {b}?",
        "Toista perässäni: {items}.",
    ),
    "pl": Phrases(
        "Liczba to {n}.",
        "Czy liczba to {n}?",
        "Zapisz liczbę {n}.",
        "Ile to jest {a} plus {b}?",
        "Co jest większe, {a} czy {b}?",
        "Powtórz za mną: {items}.",
    ),
    "cs": Phrases(
        "Číslo je {n}.",
        "Je to číslo {n}?",
        "Zapiš číslo {n}.",
        "Kolik je {a} plus {b}?",
        "Co je větší, {a} nebo {b}?",
        "Opakuj po mně: {items}.",
    ),
    "ru": Phrases(
        "Число {n}.",
        "Это число {n}?",
        "Запиши число {n}.",
        "Сколько будет {a} плюс {b}?",
        "Что больше, {a} или {b}?",
        "Повторяй за мной: {items}.",
    ),
    "uk": Phrases(
        "Число {n}.",
        "Це число {n}?",
        "Запиши число {n}.",
        "Скільки буде {a} плюс {b}?",
        "Що більше, {a} чи {b}?",
        "Повторюй за мною: {items}.",
    ),
    "tr": Phrases(
        "Sayı {n}.",
        "Sayı {n} olabilir mi?",
        "{n} sayısını yaz.",
        "{a} artı {b} kaç eder?",
        "Hangisi daha büyük, {a} ya da {b}?",
        "Benden sonra tekrarla: {items}.",
    ),
    "ar": Phrases(
        "الرقم هو {n}.",
        "هل الرقم {n}؟",
        "اكتب الرقم {n}.",
        "كم يساوي {a} زائد {b}؟",
        "أيهما أكبر، {a} أم {b}؟",
        "كرر ورائي: {items}.",
        list_sep="، ",
    ),
    "ja": Phrases(
        "数字は{n}です。",
        "数字は{n}ですか？",
        "数字の{n}を書いてください。",
        "{a}足す{b}はいくつですか？",
        "{a}と{b}、どちらが大きいですか？",
        "私の後に繰り返してください：{items}。",
        list_sep="、",
    ),
    "id": Phrases(
        "Angkanya {n}.",
        "Apakah angkanya {n}?",
        "Tulis angka {n}.",
        "Berapa {a} tambah {b}?",
        "Mana yang lebih besar, {a} atau {b}?",
        "Ulangi setelah saya: {items}.",
    ),
    "ro": Phrases(
        "Numărul este {n}.",
        "Numărul este {n}?",
        "Scrie numărul {n}.",
        "Cât fac {a} plus {b}?",
        "Care este mai mare, {a} sau {b}?",
        "Repetă după mine: {items}.",
    ),
    "hu": Phrases(
        "A szám {n}.",
        "A szám {n}?",
        "Írd le ezt a számot: {n}.",
        "Mennyi {a} meg {b}?",
        "Melyik a nagyobb, {a} vagy {b}?",
        "Ismételd utánam: {items}.",
    ),
    "vi": Phrases(
        "Con số là {n}.",
        "Con số có phải là {n} không?",
        "Hãy viết số {n}.",
        "{a} cộng {b} bằng bao nhiêu?",
        "Số nào lớn hơn, {a} hay {b}?",
        "Hãy nhắc lại theo tôi: {items}.",
    ),
    "zh": Phrases(
        "这个数字是{n}。",
        "这个数字是{n}吗？",
        "请写下数字{n}。",
        "{a}加{b}等于多少？",
        "{a}和{b}哪个大？",
        "跟我重复：{items}。",
        list_sep="，",
    ),
    "hi": Phrases(
        "संख्या {n} है।",
        "क्या संख्या {n} है?",
        "संख्या {n} लिखिए।",
        "{a} और {b} का जोड़ क्या है?",
        "कौन बड़ा है, {a} या {b}?",
        "मेरे बाद दोहराइए: {items}।",
    ),
}

_COUNT = {
    "en": "Count from {a} to {b}.",
    "de": "Zähl von {a} bis {b}.",
    "fr": "Compte de {a} à {b}.",
    "es": "Cuenta de {a} a {b}.",
    "it": "Conta da {a} a {b}.",
    "pt": "Conte de {a} até {b}.",
    "nl": "Tel van {a} tot {b}.",
    "sv": "Räkna från {a} till {b}.",
    "da": "Tæl fra {a} til {b}.",
    "nb": "Tell fra {a} til {b}.",
    "ja": "{a}から{b}まで数えてください。",
    "id": "Hitung dari {a} sampai {b}.",
    "ro": "Numără de la {a} la {b}.",
    "vi": "Hãy đếm từ {a} đến {b}.",
    "zh": "从{a}数到{b}。",
    "hi": "{a} से {b} तक गिनिए।",
}
_SPELL = {
    "en": "Spell the word {word}.",
    "de": "Buchstabiere das Wort {word}.",
    "fr": "Épelle le mot {word}.",
    "es": "Deletrea la palabra {word}.",
    "it": "Fai lo spelling della parola {word}.",
    "nl": "Spel het woord {word}.",
    "da": "Stav ordet {word}.",
    "pl": "Przeliteruj słowo {word}.",
    "cs": "Vyhláskuj slovo {word}.",
    "ru": "Произнеси по буквам слово {word}.",
    "uk": "Продиктуй по буквах слово {word}.",
    "vi": "Hãy đánh vần từ {word}.",
}
_FACTS = {
    "en": (
        "How many days are in a week?",
        "How many months are in a year?",
        "How many hours are in a day?",
        "How many minutes are in an hour?",
        "How many legs does a spider have?",
    ),
    "de": (
        "Wie viele Tage hat eine Woche?",
        "Wie viele Monate hat ein Jahr?",
        "Wie viele Stunden hat ein Tag?",
        "Wie viele Minuten hat eine Stunde?",
        "Wie viele Beine hat eine Spinne?",
    ),
    "fr": (
        "Combien de jours y a-t-il dans une semaine ?",
        "Combien de mois y a-t-il dans une année ?",
        "Combien d'heures y a-t-il dans une journée ?",
        "Combien de minutes y a-t-il dans une heure ?",
        "Combien de pattes a une araignée ?",
    ),
    "es": (
        "¿Cuántos días tiene una semana?",
        "¿Cuántos meses tiene un año?",
        "¿Cuántas horas tiene un día?",
        "¿Cuántos minutos tiene una hora?",
        "¿Cuántas patas tiene una araña?",
    ),
    "it": (
        "Quanti giorni ci sono in una settimana?",
        "Quanti mesi ci sono in un anno?",
        "Quante ore ci sono in un giorno?",
        "Quanti minuti ci sono in un'ora?",
        "Quante zampe ha un ragno?",
    ),
    "ru": (
        "Сколько дней в неделе?",
        "Сколько месяцев в году?",
        "Сколько часов в сутках?",
        "Сколько минут в часе?",
        "Сколько ног у паука?",
    ),
    "zh": ("一个星期有几天？", "一年有几个月？", "一天有几个小时？", "一个小时有几分钟？", "蜘蛛有几条腿？"),
}
PHRASEBOOK = {
    lang: replace(phrases, count=_COUNT.get(lang), spell=_SPELL.get(lang), facts=_FACTS.get(lang))
    for lang, phrases in PHRASEBOOK.items()
}

# num2words' code where it differs from ours.
_NUM2WORDS_CODE = {"nb": "no"}


def number_words(n: int, lang: str) -> str:
    """`n` as the words a speaker of `lang` says, or as digits where num2words lacks the language."""
    code = _NUM2WORDS_CODE.get(lang, lang)
    if code not in _NUM2WORDS_LANGUAGES:
        return str(n)
    return num2words(n, lang=code)


# Faker locales whose word lists are words of the language (its "lorem" provider).
WORD_LIST_LOCALES = {
    "en": "en_US",
    "de": "de_DE",
    "fr": "fr_FR",
    "es": "es_ES",
    "it": "it_IT",
    "nl": "nl_NL",
    "da": "da_DK",
    "pl": "pl_PL",
    "cs": "cs_CZ",
    "ru": "ru_RU",
    "uk": "uk_UA",
    "ar": "ar_AA",
    "ja": "ja_JP",
    "vi": "vi_VN",
    "zh": "zh_CN",
}


@cache
def _faker(locale: str):
    from faker import Faker

    return Faker(locale)


def one_word(lang: str, rng: np.random.Generator) -> str | None:
    """One real word of `lang` (4 letters or more), or None without a word list."""
    locale = WORD_LIST_LOCALES.get(lang)
    if locale is None:
        return None
    faker = _faker(locale)
    faker.seed_instance(int(rng.integers(2**31)))
    for _ in range(20):
        word = faker.word()
        if len(word) >= 4 and word.isalpha():
            return word.lower()
    return word.lower()


def word_run(lang: str, rng: np.random.Generator) -> str | None:
    """A sentence of 4 to 9 real words of `lang` in random order, or None without a word list.

    Not grammar, but the words are the language's own: transcription then learns a vocabulary
    far beyond the number templates."""
    locale = WORD_LIST_LOCALES.get(lang)
    if locale is None:
        return None
    faker = _faker(locale)
    faker.seed_instance(int(rng.integers(2**31)))
    return faker.sentence(nb_words=int(rng.integers(4, 10)), variable_nb_words=False)
