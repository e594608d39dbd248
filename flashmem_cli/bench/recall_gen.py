"""Recall benchmark generator: train / dev / test splits of `eval recall` cases.

    python -m flashmem_cli.bench.recall_gen --out DIR --seed S --cases N

Each case is a conversation whose early turns hold 2-4 facts (names, numbers, codes,
addresses, dates, times, lists, preferences and instructions), stated by the user or chosen
by the assistant, alone or several to a turn, corrected later ("no, it's X, not Y": the probe
wants X), or buried in a long pasted message; distractor turns of varied length follow until
the facts lie far outside a 512-token context. Each probe asks for one fact.

The splits share nothing: every word list (names, slot nouns, statement and question
phrasings, distractor topics) is dealt out by position (item i goes to split i mod 3), and
every generated value (invented names and places, each group of digits or code letters) by a
hash of its text, so a split's values never occur in another split, whatever the seed. The
seed only chooses within a split's own share. Extra keys (split, kind, how, values) ride
along in each line; `parse_cases` ignores them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLITS = ("train", "dev", "test")
TAIL_CHARS = 2700  # distractor text after the last fact (~600 tokens: beyond -c 512)
MIN_CHARS = 4000  # a whole case (~900 tokens or more: several consolidations at -c 512)
SHIPPED_SEED = 0  # the splits in bench/data: make_split(split, SHIPPED_SEED, SHIPPED_CASES[split])
SHIPPED_CASES = {"train": 40, "dev": 24, "test": 24}  # a dev or test run: ~15 min, 2 cores

# -- word lists: item i belongs to split i mod 3 ----------------------------------------------

FIRST_NAMES = (
    "Ysolde", "Ptolemy", "Anselm", "Dagny", "Oriel", "Tamsin", "Leopold", "Hesper", "Ignatius",
    "Marisol", "Barnaby", "Isaura", "Cosimo", "Wilhelmina", "Thaddeus", "Elspeth", "Lysander",
    "Perpetua", "Evander", "Rosamund", "Casimir", "Philippa", "Alaric", "Morwenna", "Ambrose",
    "Seraphine", "Horatio", "Clementine", "Ottoline", "Benedikt", "Araminta", "Lucius",
    "Eulalia", "Fitzgerald", "Gwendolyn", "Hieronymus", "Imogen", "Jerome", "Kerensa",
    "Leontine", "Maximilian", "Nerissa", "Octavius", "Petronella", "Quentin", "Rhiannon",
    "Sebastiano", "Theodora",
)  # fmt: skip
LAST_NAMES = (
    "Marrack", "Quennell", "Abernethy", "Tremayne", "Oakhurst", "Pendergast", "Villiers",
    "Featherstone", "Castellan", "Blackwood", "Ravensworth", "Dunmore", "Kilbride", "Ashcombe",
    "Lindqvist", "Montague", "Harrowgate", "Penrose", "Sutcliffe", "Valdivia", "Wetherby",
    "Cardew", "Fairbairn", "Gallagher", "Hollinshead", "Inchbald", "Jellicoe", "Kettering",
    "Llewellyn", "Mortimer",
)  # fmt: skip
RELATIONS = (
    "sister", "landlord", "dentist", "piano teacher", "neighbour", "accountant", "godmother",
    "team lead", "cousin", "plumber", "flatmate", "driving instructor", "vet", "editor",
    "tailor", "barber", "uncle", "mentor", "physiotherapist", "tutor", "line manager",
)  # fmt: skip
PETS = (
    "cat", "boat", "dog", "parrot", "tortoise", "car", "horse", "bicycle", "goldfish", "van",
    "telescope", "sourdough starter", "robot vacuum", "canoe", "hamster", "guitar", "caravan",
    "rabbit",
)  # fmt: skip
GATHERINGS = (
    "wedding", "reunion", "retreat", "tournament", "workshop", "conference", "festival",
    "exhibition", "book launch", "choir concert", "chess final", "family picnic", "hackathon",
    "regatta", "craft fair", "lecture series", "team offsite", "birthday party",
)  # fmt: skip
COUNTED = (
    "folding chairs", "lanterns", "name badges", "seed trays", "paint tins", "coffee cups",
    "tent pegs", "wine glasses", "notebooks", "sandbags", "candles", "extension cables",
    "bread rolls", "fence posts", "roof tiles", "raffle tickets", "flower pots", "floor tiles",
)  # fmt: skip
CODES = (
    "locker code", "booking reference", "gate code", "alarm code", "voucher code",
    "membership number", "ticket number", "invoice number", "parcel code", "tracking number",
    "wifi password", "door code", "bike lock combination", "customer number", "policy number",
    "seat reservation code", "library card number", "permit number",
)  # fmt: skip
PREMISES = (
    "{my} new flat", "the dentist's surgery", "{my} office", "{my} grandmother's house",
    "the rehearsal studio", "{my} storage unit", "the community hall", "{my} allotment",
    "the print shop", "the climbing gym", "the new bakery", "{my} brother's workshop",
    "the vet clinic", "the polling station", "the tailor's shop", "the recording studio",
    "the language school", "the bike repair shop",
)  # fmt: skip
OCCASIONS = (
    "{my} dentist appointment", "the school play", "the house viewing",
    "{my} anniversary dinner", "{my} job interview", "the boiler service", "the marathon",
    "the court hearing", "the piano recital", "the garden party", "{my} moving day",
    "{my} driving test", "the first rehearsal", "the launch party", "{my} vaccination",
    "the sailing course", "the fire inspection", "the family reunion",
)  # fmt: skip
WEEKLY = (
    "{my} yoga class", "the bin collection", "the team meeting", "choir practice",
    "the farmers' market", "{my} swimming lesson", "the book club", "{my} pottery class",
    "the street cleaning", "{my} Spanish lesson", "the quiz night", "the recycling pickup",
)  # fmt: skip
DEPARTURES = (
    "{my} ferry", "the airport shuttle", "{my} train", "the night bus", "{my} flight",
    "the coach to the coast", "the boat trip", "the last tram", "the cable car",
    "the water taxi", "the sleeper train", "the minibus", "the overnight bus", "the hydrofoil",
    "the seaplane", "the early boat", "the mail boat", "the gondola lift",
)  # fmt: skip
LISTS = (
    "shopping", "packing", "camping", "hardware store", "picnic", "baking", "first-aid kit",
    "gardening", "party supplies", "beach bag", "toolbox", "market",
)  # fmt: skip
ITEMS = (
    "saffron", "limes", "duct tape", "anchovies", "birdseed", "chalk", "quinces", "mothballs",
    "lentils", "twine", "beeswax", "sardines", "capers", "fennel", "matches", "walnuts",
    "sandpaper", "pickled ginger", "tonic water", "shoelaces", "cloves", "tinfoil", "raisins",
    "clothes pegs", "pistachios", "batteries", "molasses", "mustard seeds", "cotton wool",
    "apricots", "dental floss", "oatcakes", "wood glue", "rock salt", "marmalade", "safety pins",
)  # fmt: skip
LANGUAGES = (
    "Portuguese", "Dutch", "Welsh", "Swedish", "Italian", "Polish", "Greek", "Turkish",
    "Danish", "Catalan", "Finnish", "Czech", "Norwegian", "Hungarian", "Romanian",
)  # fmt: skip
WRITINGS = (
    "emails", "meeting notes", "summaries", "cover letters", "captions", "product descriptions",
    "newsletters", "birthday cards", "recipes", "speeches", "reports", "invitations",
)  # fmt: skip
UNITS = (  # (what is measured, its units: dealt out like the other lists)
    ("distances", ("kilometres", "miles", "furlongs")),
    ("temperatures", ("Celsius", "Fahrenheit", "kelvin")),
    ("weights", ("kilograms", "pounds", "stone")),
    ("volumes", ("litres", "gallons", "pints")),
    ("all measurements", ("metric units", "imperial units", "US customary units")),
)
FAVOURITES = (  # (a kind of thing, the values)
    ("colour", ("ochre", "teal", "vermilion", "mauve", "chartreuse", "cerulean", "magenta")),
    ("tea", ("lapsang souchong", "rooibos", "oolong", "sencha", "genmaicha", "darjeeling")),
    ("cheese", ("manchego", "taleggio", "gruyere", "stilton", "halloumi", "comte")),
    ("flower", ("foxgloves", "peonies", "ranunculus", "anemones", "hellebores", "freesias")),
    ("gemstone", ("tourmaline", "peridot", "garnet", "lapis lazuli", "moonstone", "jade")),
)
PLACE_SUFFIXES = (
    "by", "wick", "stead", "mere", "holt", "combe", "thorpe", "ford", "haven", "ton", "cott",
    "field",
)  # fmt: skip
PLACE_WORDS = ("Cross", "Point", "Green", "Quay", "Heath", "Bridge", "Reach", "End", "Hollow")
STREET_SUFFIXES = ("Row", "Road", "Street", "Lane", "Terrace", "Mews", "Close", "Walk", "Crescent")
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)  # fmt: skip
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
ORDINALS = ("first", "second", "third", "last")

# -- phrasings: questions, statements, replies (each dealt out the same way) -------------------

QUESTIONS = (
    "What is {desc}?",
    "Remind me: what is {desc}?",
    "Quick check: what is {desc}?",
    "Can you tell me {desc}?",
    "What was {desc} again?",
    "I have forgotten {desc}. What is it?",
    "Tell me {desc}, please.",
    "Do you remember {desc}?",
    "Going back to earlier: what is {desc}?",
)
PERSON_SAYS = (
    "My {noun} is called {value}.",
    "I should mention that my {noun} is {value}.",
    "Oh, and my {noun}'s name is {value}.",
    "You might hear me talk about my {noun}, {value}.",
    "My {noun} goes by {value}.",
    "For context, my {noun} is someone called {value}.",
)
PET_SAYS = (
    "My {noun} is called {value}.",
    "We named the {noun} {value}.",
    "The {noun}'s name is {value}, by the way.",
    "I call my {noun} {value}.",
    "My {noun} answers to {value}.",
    "Everyone knows my {noun} as {value}.",
)
PET_ASKS = (
    "I just got a {noun} and it needs a name. Any ideas?",
    "Could you invent a name for my new {noun}? Something unusual.",
    "Help me name my {noun}, please. I want something nobody else has.",
)
PET_OFFERS = (
    "How about {value}? It is short, unusual and easy to say.",
    "I would go with {value}. It sounds friendly and nobody else will have it.",
    "Try {value}: it is distinctive and rolls off the tongue.",
)
PLACE_SAYS = (
    "The {noun} will be held in {value}.",
    "We have booked the {noun} in a place called {value}.",
    "The {noun} is happening in {value} this year.",
    "This time the {noun} takes place in {value}.",
    "They moved the {noun} to {value}.",
    "Our {noun} is going to be in {value}.",
)
COUNT_SAYS = (
    "We need exactly {value} {noun}.",
    "The final order is {value} {noun}.",
    "Put me down for {value} {noun}, please.",
    "I have worked out that we need {value} {noun}.",
    "Altogether we need {value} {noun}.",
    "The plan calls for {value} {noun}.",
)
COUNT_DOCS = (
    "Your order of {value} {noun} has been confirmed.",
    "We have reserved {value} {noun} in your name.",
    "The delivery will contain {value} {noun}.",
)
COUNT_ASKS = (
    "How many {noun} should I order?",
    "What number of {noun} would you get, if you were me?",
    "Give me a sensible number of {noun} to buy.",
)
COUNT_OFFERS = (
    "I would order {value} {noun}; that covers everyone with a small margin.",
    "Go for {value} {noun}. That should be plenty without much waste.",
    "Buy {value} {noun}; it leaves a few spare.",
)
CODE_SAYS = (
    "My {noun} is {value}.",
    "For the record, my {noun} is {value}.",
    "Write this down: my {noun} is {value}.",
    "In case I forget, my {noun} is {value}.",
    "The {noun} they gave me is {value}.",
    "Note that my {noun} is {value}.",
)
CODE_DOCS = (
    "Your {noun} is {value}.",
    "Please keep your {noun} safe: it is {value}.",
    "For your records, your {noun} is {value}.",
)
CODE_ASKS = (
    "Can you make up a {noun} I can use as a placeholder in my notes?",
    "Invent a {noun} for me to use in the test form, please.",
    "I need a dummy {noun} for a template. Can you pick one?",
)
CODE_OFFERS = (
    "Sure, use {value} as your {noun}.",
    "Here is one you can use: {value}.",
    "Let's say {value}. It has the right format.",
)
ADDRESS_SAYS = (
    "{Noun} is at {value}.",
    "The address of {noun} is {value}.",
    "You can find {noun} at {value}.",
    "{Noun} is now at {value}.",
    "If you need it, {noun} is at {value}.",
    "{Noun} is located at {value}.",
)
ADDRESS_DOCS = (
    "{Noun} is at {value}.",
    "Please note that {noun} is now at {value}.",
    "The address for {noun} is {value}.",
)
DATE_SAYS = (
    "{Noun} is on {value}.",
    "We have set {noun} for {value}.",
    "{Noun} got booked for {value}.",
    "Mark this down: {noun} is on {value}.",
    "{Noun} is happening on {value}.",
    "They scheduled {noun} for {value}.",
)
DATE_DOCS = (
    "{Noun} is confirmed for {value}.",
    "We can confirm that {noun} will take place on {value}.",
    "Please remember that {noun} is on {value}.",
)
DATE_ASKS = (
    "Which date would you suggest for {noun}? Anything in the next few months is fine.",
    "Pick a date for {noun}, please. I trust you.",
    "Can you choose a day for {noun}? I can't decide.",
)
DATE_OFFERS = (
    "Let's go with {value}; it avoids the busy holiday weeks.",
    "I would pick {value}. It gives you enough time to prepare.",
    "How about {value}? Nothing much else happens then.",
)
WEEKDAY_SAYS = (
    "{Noun} is on {value}s.",
    "{Noun} happens every {value}.",
    "We do {noun} on {value}s.",
    "{Noun} is every {value} at the moment.",
    "{Noun} takes place on {value}s.",
    "Every {value} there is {noun}.",
)
TIME_SAYS = (
    "{Noun} leaves at {value}.",
    "{Noun} departs at {value}.",
    "I need to catch {noun} at {value}.",
    "{Noun} goes at {value}.",
    "The timetable says {noun} leaves at {value}.",
    "{Noun} is scheduled for {value}.",
)
TIME_DOCS = (
    "{Noun} departs at {value}.",
    "Please be on time: {noun} leaves at {value}.",
    "We expect {noun} to depart at {value}.",
)
LIST_SAYS = (
    "My {noun} list: {value}.",
    "For the {noun} list I have written {value}.",
    "Here is my {noun} list, in order: {value}.",
    "I made a {noun} list: {value}.",
    "So far my {noun} list says {value}.",
    "My {noun} list has {value} on it.",
)
LANGUAGE_SAYS = (
    "Whenever you draft my {noun}, write them in {value}.",
    "Please always write my {noun} in {value}.",
    "From now on my {noun} should be in {value}.",
    "I want all my {noun} written in {value}.",
    "Use {value} for any {noun} you write for me.",
    "My {noun} always need to be in {value}.",
)
NICKNAME_SAYS = (
    "Please always call me {value}.",
    "Everyone calls me {value}, so you should too.",
    "Just call me {value} from now on.",
    "I prefer to be called {value}.",
    "Address me as {value}, please.",
    "My friends call me {value}; you can as well.",
)
UNIT_SAYS = (
    "Always give me {noun} in {value}.",
    "Please use {value} for {noun} when you answer me.",
    "When you mention {noun}, use {value}.",
    "I think in {value}, so give me {noun} that way.",
    "Stick to {value} for {noun}, please.",
    "For {noun}, always answer in {value}.",
)
FAVOURITE_SAYS = (
    "My favourite {noun} is {value}.",
    "I really love {value}; it is my favourite {noun}.",
    "If you ever need to know, my favourite {noun} is {value}.",
    "Nothing beats {value}, my favourite {noun}.",
    "My all-time favourite {noun} is {value}.",
    "When it comes to {noun}, {value} is my favourite.",
)
CORRECTIONS = (
    "Sorry, I got {desc} wrong: it is {new}, not {old}.",
    "Wait, correction: {desc} is {new}, not {old}.",
    "No, hang on, {desc} is actually {new}, not {old}.",
    "I made a mistake earlier. {Desc} is {new}, not {old}.",
    "Correction, please: {desc} is {new}, not {old}.",
    "My mistake: {desc} is {new}. Not {old}.",
)
CORRECTION_ACKS = (
    "Thanks for the correction; I have updated it.",
    "No problem, I have fixed that.",
    "Got it, I will use the corrected one.",
    "Understood, the earlier one is out.",
    "Thanks, noted the change.",
    "Okay, corrected.",
)
PREFACES = (
    "Before we start, a bit of background.",
    "Hi! Some things you should know about me first.",
    "Hello. Let me give you some context.",
    "Good morning! A few details first.",
    "Hey there. Quick background before my questions.",
    "Hi, I want to note a few things down with you.",
)
ACKS = (
    "Got it, I will keep that in mind.",
    "Thanks, noted.",
    "Understood. Anything else you would like me to remember?",
    "Okay, I have made a note of it.",
    "Thanks for letting me know.",
    "Noted. That is useful to know.",
    "All right, I will remember that.",
    "Good to know, thanks.",
    "Sure, I have that written down.",
)
ECHOES = (
    "Noted: {value}.",
    "Got it, {value}.",
    "Okay: {value}. Noted.",
    "Thanks. {value}, understood.",
    "{value}, got it.",
    "Understood, {value}.",
)
FOLLOW_UPS = (
    ("Perfect, that's the one.", "Great, glad you like it."),
    ("Lovely, let's use that.", "Good choice."),
    ("Great, thanks.", "You're welcome."),
    ("Works for me.", "Happy to help."),
    ("Good pick, I'll go with it.", "Excellent."),
    ("Yes, that will do nicely.", "Glad it fits."),
)
PASTES = (
    "Here is a message I got from {sender}. Can you check that it reads well?\n\n{doc}",
    "I received this from {sender}. Is there anything in it I need to act on?\n\n{doc}",
    "Can you tidy up the wording of this note from {sender}?\n\n{doc}",
    "This came in from {sender} this morning. Any thoughts?\n\n{doc}",
    "Could you summarise this message from {sender} for me?\n\n{doc}",
    "What do you make of this letter from {sender}?\n\n{doc}",
)
PASTE_REPLIES = (
    "It reads well overall. I would split the long paragraph and cut a couple of repeated phrases.",
    "Mostly routine. Keep the practical details somewhere handy and reply if anything is unclear.",
    "The tone is friendly and clear. I would move the practical details to the top.",
    "It is a standard update. Nothing looks urgent, but keep the details in mind.",
    "The message is polite and covers the basics; it could be shorter, but it is fine.",
    "Nothing alarming there. Just keep the practical details somewhere you will find them.",
)
SENDERS = (
    "my landlord", "the school office", "the council", "the gym", "the sailing club",
    "the bank", "the letting agent", "the museum", "the choir committee", "the garage",
    "the library", "the travel agent",
)  # fmt: skip
DOC_SENTENCES = (
    "Thank you for getting in touch with us earlier this week.",
    "Please read the following information carefully before your visit.",
    "We are making a few changes to how things work over the coming months.",
    "If anything here is unclear, simply reply to this message and we will help.",
    "We appreciate your patience while the building work is finished.",
    "As always, we are grateful for your continued support.",
    "Our team has reviewed your request and everything is in order.",
    "There is no need to print this message; showing it on your phone is enough.",
    "Parking nearby is limited, so we suggest arriving a little early.",
    "We will send a reminder closer to the time.",
    "Please let us know as soon as possible if your plans change.",
    "Refreshments will be available, and there is step-free access at the side entrance.",
    "We look forward to seeing you soon.",
    "Kind regards from everyone in the office.",
    "The usual terms and conditions apply to all bookings.",
    "Some of the details below have changed since our last message.",
    "Please bring a form of identification with you on the day.",
    "Unfortunately we are unable to offer refunds for missed appointments.",
)
SYSTEM_PROMPTS = (
    "You are a friendly, helpful assistant.",
    "You are a helpful assistant. Answer clearly and concisely.",
    "You are a patient assistant who remembers what the user tells you.",
    "You are a knowledgeable, polite assistant.",
    "You are an assistant that gives practical, careful answers.",
    "You are a warm and attentive assistant.",
)
SMALL_TALK = (
    ("Thanks, that helps a lot.", "You're welcome! Let me know if anything else comes up."),
    ("Interesting, I did not know that.", "It surprises a lot of people."),
    ("Okay, moving on.", "Sure, what would you like to talk about next?"),
    ("Ha, fair enough.", "Glad that made sense."),
    ("Let me think about that for a moment.", "Take your time."),
    ("Good point.", "Thanks. It is easy to overlook."),
    ("That makes sense.", "Great. Anything else on your mind?"),
    ("I will try that this weekend.", "Good luck with it!"),
    ("Hmm, not sure I agree, but okay.", "That is fair; people do it differently."),
    ("Right, next question.", "Go ahead."),
    ("Brilliant, thank you.", "Any time."),
    ("Noted, cheers.", "Happy to help."),
)
TOPICS = (  # (questions, sentences of an answer): distractor turns
    (
        (
            "How do I get a more open crumb in my sourdough?",
            "Why does my bread come out dense?",
            "Any tips for shaping a loaf?",
        ),
        (
            "A more open crumb usually comes from a wetter dough and a patient bulk fermentation.",
            "Strong flour with plenty of protein holds the gas bubbles better than plain flour.",
            "Folding the dough gently every half hour builds strength without knocking the air out.",
            "Let the dough rise until it has grown by about half and feels airy and wobbly.",
            "Shaping should create surface tension, so drag the dough towards you on an unfloured bench.",
            "A long, cold rest in the fridge develops flavour and makes scoring much easier.",
            "Bake in a preheated covered pot so the steam lets the loaf expand before the crust sets.",
            "Resist cutting the loaf while it is hot, because the crumb is still setting as it cools.",
        ),
    ),
    (
        (
            "How often should I water my houseplants?",
            "Why are the leaves on my plant turning yellow?",
            "What is the best way to repot a plant?",
        ),
        (
            "Most houseplants prefer to dry out a little between waterings rather than stay soggy.",
            "Push a finger into the soil, and water only when the top layer feels dry.",
            "Yellow lower leaves often mean too much water, while crispy brown edges suggest too little.",
            "Pots need drainage holes, otherwise water collects at the bottom and the roots rot.",
            "Repot in spring, when the plant is starting to grow and can recover quickly.",
            "Choose a pot only slightly larger than the old one, so the soil does not stay wet for weeks.",
            "Loosen circling roots gently with your fingers before settling the plant in fresh compost.",
            "After repotting, keep the plant out of harsh direct sun for a week while it settles.",
        ),
    ),
    (
        (
            "How should a beginner start running?",
            "My knees hurt after running. What am I doing wrong?",
            "How do I run further without getting exhausted?",
        ),
        (
            "Start with short intervals of running and walking, and build up gradually over several weeks.",
            "Most beginners run too fast, so slow down until you could hold a conversation.",
            "Sore knees often come from increasing distance too quickly or from worn-out shoes.",
            "Shorter, quicker steps land under your hips and reduce the jarring on your joints.",
            "Add a little distance each week rather than making big jumps.",
            "Rest days matter, because your muscles and tendons adapt while you recover.",
            "Simple strength exercises such as squats and lunges make running feel easier.",
            "Drink water through the day instead of gulping a lot just before you head out.",
        ),
    ),
    (
        (
            "How can I get better at drawing faces?",
            "What should I practise when I start learning to draw?",
            "My sketches look flat. How do I add depth?",
        ),
        (
            "Begin with simple shapes and proportions before worrying about details.",
            "The eyes sit roughly halfway down the head, which surprises most beginners.",
            "Draw from life as often as you can, because photographs flatten form.",
            "Short daily sessions build skill faster than an occasional long afternoon.",
            "Shading from a single light source gives a drawing a convincing sense of depth.",
            "Squint at your subject to see the big areas of light and shadow.",
            "Overlapping shapes and smaller distant objects suggest space on a flat page.",
            "Keep your old sketchbooks; looking back shows how much you have improved.",
        ),
    ),
    (
        (
            "How should I set up my desk to avoid back pain?",
            "What is a good height for a computer screen?",
            "Is a standing desk worth it?",
        ),
        (
            "Your feet should rest flat on the floor with your knees at roughly a right angle.",
            "The top of the screen should sit at or slightly below eye level.",
            "Keep the keyboard close enough that your elbows stay relaxed by your sides.",
            "A small cushion behind the lower back helps if the chair has little support.",
            "Standing desks help mainly because they encourage you to change position.",
            "No single posture is perfect, so the best one is usually your next one.",
            "Take short breaks to stand, stretch and look at something far away.",
            "Good lighting from the side reduces glare and eye strain.",
        ),
    ),
    (
        (
            "How do I start composting at home?",
            "Why does my compost heap smell bad?",
            "What can and cannot go in a compost bin?",
        ),
        (
            "A good heap mixes green material such as peelings with brown material such as cardboard.",
            "A bad smell usually means too much wet green material and not enough air.",
            "Turning the heap every few weeks lets oxygen in and speeds everything up.",
            "Cooked food, meat and dairy attract pests, so most home bins leave them out.",
            "Shredded paper and egg boxes are excellent brown material.",
            "The heap should feel like a wrung-out sponge: damp but not dripping.",
            "Finished compost is dark and crumbly and smells like a forest floor.",
            "A sunny spot keeps the heap warm, which helps the microbes work faster.",
        ),
    ),
    (
        (
            "How can I save more money each month?",
            "What is a simple way to make a budget?",
            "Should I pay off debt or build savings first?",
        ),
        (
            "Start by tracking every expense for a month to see where the money really goes.",
            "Automatic transfers to savings on payday make saving the default.",
            "Small regular costs such as subscriptions add up faster than people expect.",
            "A simple budget splits income into needs, wants and savings.",
            "An emergency fund stops a surprise bill from turning into new debt.",
            "High-interest debt usually deserves attention before extra saving.",
            "Cooking at home a few more nights a week makes a noticeable difference.",
            "Review the budget every few months, because life and prices change.",
        ),
    ),
    (
        (
            "How can I fall asleep more easily?",
            "Why do I wake up tired even after a full night?",
            "Is it bad to look at my phone in bed?",
        ),
        (
            "Going to bed and getting up at the same time every day steadies your body clock.",
            "A cool, dark and quiet bedroom makes falling asleep much easier.",
            "Bright screens late at night can delay the feeling of sleepiness.",
            "Caffeine lingers for hours, so an afternoon coffee can still affect the night.",
            "A short wind-down routine tells your brain that the day is over.",
            "Waking up tired can come from broken sleep that you do not remember.",
            "Daylight in the morning helps you feel alert and sleep better later.",
            "If you cannot sleep, get up for a while rather than lying there frustrated.",
        ),
    ),
    (
        (
            "How do I look after my bike chain?",
            "Why do my brakes squeal?",
            "What basic bike maintenance should I learn?",
        ),
        (
            "Wipe the chain with a rag, then apply a little lubricant to each link.",
            "Too much oil attracts grit, so wipe off the excess after lubricating.",
            "Squealing brakes often have dirty pads or a contaminated rim.",
            "Check the tyre pressure every week, because soft tyres puncture more easily.",
            "Learning to fix a puncture at the roadside saves a long walk home.",
            "Listen for clicks and creaks, because they are early warnings of wear.",
            "A worn chain also wears the gears, so replacing it early saves money.",
            "Keep the bike somewhere dry, since rain and damp corrode the parts.",
        ),
    ),
    (
        (
            "How do I write a good cover letter?",
            "How long should a cover letter be?",
            "What should I avoid in a cover letter?",
        ),
        (
            "A good cover letter shows how your experience fits this particular role.",
            "Open with a sentence that says which job you want and why it interests you.",
            "Give one or two concrete examples instead of a list of adjectives.",
            "One page is enough for almost every application.",
            "Avoid repeating your whole history, because the reader already has it.",
            "Mirror a few key words from the advert so your fit is easy to see.",
            "End by saying you would welcome the chance to talk further.",
            "Read it aloud before sending; awkward sentences stand out when spoken.",
        ),
    ),
    (
        (
            "How do I get started with birdwatching?",
            "What binoculars are good for birdwatching?",
            "When is the best time of day to see birds?",
        ),
        (
            "Early morning is usually the busiest time, when birds are feeding and singing.",
            "A modest pair of binoculars is plenty for a beginner.",
            "Learning a few common songs helps you notice birds you cannot see.",
            "Move slowly and stay quiet, and birds will soon ignore you.",
            "A field guide with clear pictures helps you tell similar species apart.",
            "Keeping a notebook of what you see makes each walk more rewarding.",
            "Wetlands and woodland edges tend to hold the widest variety of birds.",
            "A feeder in the garden brings the birds to you in winter.",
        ),
    ),
    (
        (
            "How do I make better coffee at home?",
            "Why does my coffee taste bitter?",
            "Is a grinder really worth buying?",
        ),
        (
            "Freshly ground beans make the biggest difference to flavour.",
            "Bitterness often means the water was too hot or the coffee steeped too long.",
            "Sourness usually means the grind was too coarse or the brew too short.",
            "A burr grinder gives an even grind, which makes the taste more consistent.",
            "Weighing coffee and water takes the guesswork out of every cup.",
            "Store beans in an airtight container away from light and heat.",
            "Clean equipment matters, since old coffee oils go stale and taint the cup.",
            "Filtered water helps if your tap water is very hard.",
        ),
    ),
    (
        (
            "How should I practise an instrument as an adult beginner?",
            "I keep making the same mistakes when I play. What can I do?",
            "How long should I practise each day?",
        ),
        (
            "Short, focused practice every day beats one long session at the weekend.",
            "Slow practice is the fastest way to play a passage well.",
            "Repeat only the bar that goes wrong instead of starting from the beginning each time.",
            "Recording yourself reveals problems you cannot hear while playing.",
            "Warm up with scales so your fingers are ready for harder music.",
            "A metronome keeps your timing honest and shows real progress.",
            "Choose pieces you enjoy, because motivation keeps you practising.",
            "A teacher can spot habits early, before they become hard to change.",
        ),
    ),
    (
        (
            "How do I start decluttering my home?",
            "I find it hard to throw things away. Any advice?",
            "How do I keep my home tidy once it is decluttered?",
        ),
        (
            "Start with one small area, such as a single drawer, to build momentum.",
            "Ask whether you have used an item in the last year, and be honest.",
            "Sentimental items are hardest, so leave them until you have had some practice.",
            "A box for donations makes it easier to let go of useful things.",
            "Everything needs a home, otherwise clutter creeps back onto surfaces.",
            "Ten minutes of tidying each evening stops mess from building up.",
            "When something new comes in, consider letting something old go.",
            "Clear surfaces make a room feel calmer and easier to clean.",
        ),
    ),
    (
        (
            "How can I take better photos with my phone?",
            "Why are my photos always blurry?",
            "What is the rule of thirds?",
        ),
        (
            "Good light matters more than any camera, so shoot near a window or outdoors.",
            "Blurry photos often come from movement, so hold the phone steady with both hands.",
            "The rule of thirds places the subject off centre, which often looks more natural.",
            "Tap the screen to focus on the subject before you take the picture.",
            "Clean the lens, because a greasy fingerprint softens every shot.",
            "Get closer to your subject instead of relying on the zoom.",
            "Shoot a few frames of each scene and keep only the best one.",
            "A simple background keeps attention on the subject.",
        ),
    ),
)

# -- values: generated ones belong to the split their text hashes to --------------------------

ONSETS = (
    "b", "br", "d", "dr", "f", "g", "gr", "k", "l", "m", "n", "p", "r", "s", "st", "t", "th",
    "v", "w", "z", "c", "h", "sh", "ch", "tr", "pl",
)  # fmt: skip
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ou", "y")
CODAS = ("", "n", "r", "l", "s", "th", "nd", "rk", "st", "m", "x", "ll")
CODE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"


def part_of(text: str) -> int:
    """The split (0, 1, 2) a generated word or group of digits belongs to."""
    return hashlib.sha256(text.lower().encode("utf-8")).digest()[0] % 3


def _groups(text: str) -> list[str]:
    return re.findall(r"[0-9]+|[A-Z]{2,}", text)


class Pool:
    """One split's share of every list, and values drawn from it with the split's own rng."""

    def __init__(self, split: str, rng: random.Random):
        self.part = SPLITS.index(split)
        self.rng = rng

    def share(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.part :: 3])

    def pick(self, items: Sequence[Any]) -> Any:
        return self.rng.choice(self.share(items))

    def owned(self, make: Callable[[], str]) -> str:
        """A value from `make` whose digit groups and code letters all belong to this split."""
        while True:
            value = make()
            if all(part_of(group) == self.part for group in _groups(value)):
                return value

    def word(self, longest: int = 8) -> str:
        """An invented name of this split."""
        rng = self.rng
        while True:
            syllables = [
                rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice((2, 2, 3)))
            ]
            word = ("".join(syllables) + rng.choice(CODAS)).capitalize()
            if 4 <= len(word) <= longest and part_of(word) == self.part:
                return word

    def number(self, low: int, high: int) -> str:
        return self.owned(lambda: str(self.rng.randint(low, high)))

    def code(self) -> str:
        rng = self.rng

        def letters(n: int) -> str:
            return "".join(rng.choice(CODE_LETTERS) for _ in range(n))

        forms = (
            lambda: str(rng.randint(1000, 9999)),
            lambda: f"{letters(2)}-{rng.randint(1000, 9999)}",
            lambda: f"{rng.randint(100, 999)}-{letters(3)}",
        )
        return self.owned(rng.choice(forms))

    def place(self) -> str:
        if self.rng.random() < 0.5:
            return self.word(6) + self.pick(PLACE_SUFFIXES)
        return f"{self.word()} {self.pick(PLACE_WORDS)}"

    def address(self) -> str:
        number = self.number(2, 240)
        return f"{number} {self.word()} {self.pick(STREET_SUFFIXES)}"

    def date(self) -> str:
        return f"{self.pick(MONTHS)} {self.number(1, 28)}"

    def time(self) -> str:
        rng = self.rng
        return self.owned(lambda: f"{rng.randint(5, 22):02d}:{rng.randrange(0, 60, 5):02d}")

    def person(self) -> str:
        return f"{self.pick(FIRST_NAMES)} {self.pick(LAST_NAMES)}"


# -- slots: what a fact is about, how it is said and asked -------------------------------------


@dataclass(frozen=True)
class Slot:
    kind: str
    desc: str  # what a probe asks for: "my locker code"
    draw: Callable[[], tuple[str, str]]  # a fresh value: (as stated, the expected answer)
    says: Callable[[str], str]  # the user stating a value
    doc: Callable[[str], str] | None = None  # the same inside a pasted message
    ask: str | None = None  # the user asking the assistant to choose one
    offer: Callable[[str], str] | None = None  # the assistant choosing a value
    offered: str | None = None  # `desc` when the assistant chose it
    fixable: bool = True  # a split has other values to correct it to


def _say(pool: Pool, templates: Sequence[str], noun: str) -> Callable[[str], str]:
    """A statement of this split with `noun` filled in ("my" for the user's own things)."""
    template = pool.pick(templates)
    mine = noun.format(my="my")
    return lambda value: _fill(template, mine, value)


def _doc(pool: Pool, templates: Sequence[str], noun: str) -> Callable[[str], str]:
    template = pool.pick(templates)
    yours = noun.format(my="your")
    return lambda value: _fill(template, yours, value)


def _fill(template: str, noun: str, value: str) -> str:
    return template.format(noun=noun, Noun=noun[:1].upper() + noun[1:], value=value)


def _same(make: Callable[[], str]) -> Callable[[], tuple[str, str]]:
    def draw() -> tuple[str, str]:
        value = make()
        return value, value

    return draw


def person_slot(p: Pool) -> Slot:
    noun = p.pick(RELATIONS)

    def draw() -> tuple[str, str]:
        full = p.person()
        return full, full.split()[0]

    desc = f"my {noun}'s first name"
    return Slot("person", desc, draw, _say(p, PERSON_SAYS, noun), fixable=False)


def pet_slot(p: Pool) -> Slot:
    noun = p.pick(PETS)
    return Slot(
        "name",
        f"the name of my {noun}",
        _same(p.word),
        _say(p, PET_SAYS, noun),
        ask=p.pick(PET_ASKS).format(noun=noun),
        offer=_say(p, PET_OFFERS, noun),
        offered=f"the name you suggested for my {noun}",
    )


def place_slot(p: Pool) -> Slot:
    noun = p.pick(GATHERINGS)
    desc = f"the place where the {noun} will be held"
    return Slot("place", desc, _same(p.place), _say(p, PLACE_SAYS, noun))


def count_slot(p: Pool) -> Slot:
    noun = p.pick(COUNTED)
    return Slot(
        "number",
        f"the number of {noun} we need",
        _same(lambda: p.number(11, 480)),
        _say(p, COUNT_SAYS, noun),
        doc=_doc(p, COUNT_DOCS, noun),
        ask=p.pick(COUNT_ASKS).format(noun=noun),
        offer=_say(p, COUNT_OFFERS, noun),
        offered=f"the number of {noun} you told me to order",
    )


def code_slot(p: Pool) -> Slot:
    noun = p.pick(CODES)
    return Slot(
        "code",
        f"my {noun}",
        _same(p.code),
        _say(p, CODE_SAYS, noun),
        doc=_doc(p, CODE_DOCS, noun),
        ask=p.pick(CODE_ASKS).format(noun=noun),
        offer=_say(p, CODE_OFFERS, noun),
        offered=f"the {noun} you made up for me",
    )


def address_slot(p: Pool) -> Slot:
    noun = p.pick(PREMISES)
    desc = f"the address of {noun.format(my='my')}"
    says, doc = _say(p, ADDRESS_SAYS, noun), _doc(p, ADDRESS_DOCS, noun)
    return Slot("address", desc, _same(p.address), says, doc=doc)


def date_slot(p: Pool) -> Slot:
    noun = p.pick(OCCASIONS)
    mine = noun.format(my="my")
    return Slot(
        "date",
        f"the date of {mine}",
        _same(p.date),
        _say(p, DATE_SAYS, noun),
        doc=_doc(p, DATE_DOCS, noun),
        ask=p.pick(DATE_ASKS).format(noun=mine),
        offer=_say(p, DATE_OFFERS, noun),
        offered=f"the date you suggested for {mine}",
    )


def weekday_slot(p: Pool) -> Slot:
    noun = p.pick(WEEKLY)
    desc = f"the day of the week of {noun.format(my='my')}"
    return Slot("weekday", desc, _same(lambda: p.pick(WEEKDAYS)), _say(p, WEEKDAY_SAYS, noun))


def time_slot(p: Pool) -> Slot:
    noun = p.pick(DEPARTURES)
    desc = f"the time {noun.format(my='my')} leaves"
    says, doc = _say(p, TIME_SAYS, noun), _doc(p, TIME_DOCS, noun)
    return Slot("time", desc, _same(p.time), says, doc=doc)


def list_slot(p: Pool) -> Slot:
    noun = p.pick(LISTS)
    ordinal = p.rng.choice(ORDINALS)
    at = {"first": 0, "second": 1, "third": 2, "last": 3}[ordinal]

    def draw() -> tuple[str, str]:
        items = p.rng.sample(p.share(ITEMS), 4)
        return f"{', '.join(items[:3])} and {items[3]}", items[at]

    desc = f"the {ordinal} item on my {noun} list"
    return Slot("list", desc, draw, _say(p, LIST_SAYS, noun), fixable=False)


def language_slot(p: Pool) -> Slot:
    noun = p.pick(WRITINGS)
    desc = f"the language I want my {noun} written in"
    return Slot("instruction", desc, _same(lambda: p.pick(LANGUAGES)), _say(p, LANGUAGE_SAYS, noun))


def nickname_slot(p: Pool) -> Slot:
    desc = "the name I asked you to call me"
    return Slot("instruction", desc, _same(p.word), _say(p, NICKNAME_SAYS, ""))


def units_slot(p: Pool) -> Slot:
    noun, units = p.rng.choice(UNITS)
    desc = f"the unit I asked you to use for {noun}"
    draw = _same(lambda: p.pick(units))  # one unit of each kind per split: nothing to fix
    return Slot("instruction", desc, draw, _say(p, UNIT_SAYS, noun), fixable=False)


def favourite_slot(p: Pool) -> Slot:
    noun, values = p.rng.choice(FAVOURITES)
    desc = f"my favourite {noun}"
    return Slot("preference", desc, _same(lambda: p.pick(values)), _say(p, FAVOURITE_SAYS, noun))


SLOT_MAKERS: tuple[Callable[[Pool], Slot], ...] = (
    person_slot, pet_slot, place_slot, count_slot, code_slot, address_slot, date_slot,
    weekday_slot, time_slot, list_slot, language_slot, nickname_slot, units_slot, favourite_slot,
)  # fmt: skip

# -- a conversation ----------------------------------------------------------------------------

Exchange = tuple[str, str]  # (user, assistant)


@dataclass
class Fact:
    slot: Slot
    shown: str
    answer: str
    how: str  # said | multi | offered | pasted | corrected
    values: list[str]  # every value it put in the conversation (a correction's old one too)


def make_split(split: str, seed: int, n_cases: int) -> list[dict[str, Any]]:
    """`n_cases` cases of `split`, the same for the same seed."""
    rng = random.Random(seed * len(SPLITS) + SPLITS.index(split))
    pool = Pool(split, rng)
    return [make_case(pool, f"{split}-{seed}-{i:04d}") for i in range(n_cases)]


def make_case(p: Pool, case_id: str) -> dict[str, Any]:
    while True:  # the rare draw whose answers turn up in its distractor text is drawn again
        facts = draw_facts(p, p.rng.randint(2, 4))
        filler = Distractors(p)
        head = fact_exchanges(p, facts, filler)
        tail = filler.take(max(TAIL_CHARS, MIN_CHARS - _chars(head)))
        if not any(_mentions(_text(tail), fact.answer) for fact in facts):
            break
    system = p.pick(SYSTEM_PROMPTS) if p.rng.random() < 0.6 else None
    turns = _turns(system, head + tail)
    probes = [_probe(p, fact) for fact in facts]
    p.rng.shuffle(probes)
    return {
        "id": case_id,
        "split": SPLITS[p.part],
        "turns": turns,
        "probes": probes,
        "facts_end": len(turns) - 2 * len(tail),  # turns from here on hold no fact
        "values": [value for fact in facts for value in fact.values],
    }


def draw_facts(p: Pool, n: int) -> list[Fact]:
    """`n` facts about different slots, no answer inside another."""
    facts: list[Fact] = []
    makers = p.rng.sample(SLOT_MAKERS, n)
    for make in makers:
        slot = make(p)
        while True:
            shown, answer = slot.draw()
            taken = [f.answer.lower() for f in facts] + [v.lower() for f in facts for v in f.values]
            if not any(answer.lower() in t or t in shown.lower() for t in taken):
                break
        facts.append(Fact(slot, shown, answer, _how(p, slot), [shown]))
    return facts


def _how(p: Pool, slot: Slot) -> str:
    roll = p.rng.random()
    if slot.offer is not None and roll < 0.25:
        return "offered"
    if slot.doc is not None and roll < 0.45:
        return "pasted"
    if slot.fixable and roll < 0.65:
        return "corrected"
    return "said"


def fact_exchanges(p: Pool, facts: list[Fact], filler: Distractors) -> list[Exchange]:
    """The conversation up to its last fact: facts in turns, distractors between them,
    corrections a few exchanges after the value they correct."""
    said = [f for f in facts if f.how == "said"]
    if len(said) >= 2 and p.rng.random() < 0.35:
        for fact in said:
            fact.how = "multi"
    blocks: list[tuple[list[Exchange], list[Exchange]]] = []
    multi = [f for f in facts if f.how == "multi"]
    if multi:
        user = " ".join(f.slot.says(f.shown) for f in multi)
        blocks.append(([(user, p.pick(ACKS))], []))
    blocks += [single_fact(p, fact) for fact in facts if fact.how != "multi"]
    p.rng.shuffle(blocks)
    head: list[Exchange] = []
    later: list[Exchange] = []
    for now, after in blocks:
        head += now + filler.take(p.rng.choice((0, 150, 400, 700)))
        later += after
    head += later + filler.take(p.rng.choice((0, 300)))
    first_user, first_reply = head[0]
    head[0] = (f"{p.pick(PREFACES)} {first_user}", first_reply)
    return head


def single_fact(p: Pool, fact: Fact) -> tuple[list[Exchange], list[Exchange]]:
    """The exchanges of one fact: (now, later); a correction is said later."""
    slot = fact.slot
    if fact.how == "offered":
        assert slot.ask and slot.offer
        return [(slot.ask, slot.offer(fact.shown)), p.pick(FOLLOW_UPS)], []
    if fact.how == "pasted":
        assert slot.doc
        return [(paste(p, slot.doc(fact.shown)), p.pick(PASTE_REPLIES))], []
    if fact.how == "corrected":
        return [(slot.says(fact.shown), p.pick(ACKS))], [correction(p, fact)]
    reply = p.pick(ECHOES).format(value=fact.shown) if p.rng.random() < 0.3 else p.pick(ACKS)
    return [(slot.says(fact.shown), reply)], []


def correction(p: Pool, fact: Fact) -> Exchange:
    """Replace the fact's value with another of its slot: the probe then wants the new one."""
    old = fact.shown
    while (new := fact.slot.draw())[0] == old or new[1].lower() in old.lower():
        pass
    fact.shown, fact.answer = new
    fact.values.append(fact.shown)
    desc = fact.slot.desc
    fix = p.pick(CORRECTIONS).format(
        desc=desc, Desc=desc[:1].upper() + desc[1:], new=fact.shown, old=old
    )
    return fix, p.pick(CORRECTION_ACKS)


def paste(p: Pool, fact_sentence: str) -> str:
    """A long pasted message with the fact in its middle."""
    sentences = p.rng.sample(p.share(DOC_SENTENCES), 5)
    topic = p.pick(TOPICS)[1]
    sentences += p.rng.sample(topic, 3)
    cut = p.rng.randint(2, len(sentences) - 2)
    body = " ".join(sentences[:cut] + [fact_sentence] + sentences[cut:])
    return p.pick(PASTES).format(sender=p.pick(SENDERS), doc=body)


class Distractors:
    """A case's off-topic exchanges: each question of the split once and each sentence of a
    topic once, until they run out (then again, reshuffled)."""

    def __init__(self, p: Pool):
        self.p = p
        self.questions: list[tuple[str, int]] = []
        self.sentences: dict[int, list[str]] = {}

    def take(self, at_least: int) -> list[Exchange]:
        """Exchanges of varied length, `at_least` characters in all."""
        out: list[Exchange] = []
        while _chars(out) < at_least:
            out.append(self.exchange())
        return out

    def exchange(self) -> Exchange:
        rng, topics = self.p.rng, self.p.share(TOPICS)
        if rng.random() < 0.2:
            return self.p.pick(SMALL_TALK)
        if not self.questions:
            self.questions = [(q, i) for i, (qs, _) in enumerate(topics) for q in qs]
            rng.shuffle(self.questions)
        question, topic = self.questions.pop()
        left = self.sentences.get(topic) or rng.sample(topics[topic][1], len(topics[topic][1]))
        n = rng.randint(1, 7)
        self.sentences[topic] = left[n:]
        return question, " ".join(left[:n])


def _probe(p: Pool, fact: Fact) -> dict[str, str]:
    desc = fact.slot.offered if fact.how == "offered" and fact.slot.offered else fact.slot.desc
    return {
        "question": p.pick(QUESTIONS).format(desc=desc),
        "answer": fact.answer,
        "kind": fact.slot.kind,
        "how": fact.how,
    }


def _turns(system: str | None, exchanges: list[Exchange]) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    for user, assistant in exchanges:
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return turns


def _chars(exchanges: list[Exchange]) -> int:
    return sum(len(user) + len(reply) for user, reply in exchanges)


def _text(exchanges: list[Exchange]) -> str:
    return " ".join(user + " " + reply for user, reply in exchanges)


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


# -- files -------------------------------------------------------------------------------------


def split_path(out: Path, split: str) -> Path:
    return out / f"recall-{split}.jsonl"


def shipped_path(split: str) -> Path:
    """A split shipped with flashmem (bench/data/recall-SPLIT.jsonl)."""
    return split_path(Path(__file__).parent / "data", split)


def write_splits(out: Path, seed: int, n_cases: dict[str, int]) -> list[Path]:
    """recall-SPLIT.jsonl in `out` for each split, with `n_cases[split]` cases."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for split in SPLITS:
        cases = make_split(split, seed, n_cases[split])
        lines = [json.dumps(case, ensure_ascii=False) for case in cases]
        path = split_path(out, split)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for recall-*.jsonl")
    parser.add_argument("--seed", type=int, default=SHIPPED_SEED)
    parser.add_argument("--cases", type=int, help="cases per split (default: as shipped)")
    args = parser.parse_args(argv)
    sizes = {s: args.cases for s in SPLITS} if args.cases else SHIPPED_CASES
    for path in write_splits(args.out, args.seed, sizes):
        print(path)


if __name__ == "__main__":
    main()
