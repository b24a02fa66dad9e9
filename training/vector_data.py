"""The built-in contrastive data of `steerserve train vectors --persona POSITIVE,NEGATIVE`, written
for steerserve (offline, no download): neutral statement openings about everyday things. As in
repeng's persona recipe, each is cut after every token to give many partial assistant replies;
a pair is the same partial reply after "Act as if you're extremely POSITIVE." and after
"... NEGATIVE.", so the two differ only in the persona the model was asked to play.

`HELD_OUT_PROMPTS` are user questions the statements do not contain, for the effect evaluation
(`steerserve train eval-vectors`).
"""

from __future__ import annotations

PERSONA_TEMPLATE = "Act as if you're extremely {persona}."

STATEMENTS = [
    "The weather today is",
    "When I think about my job, I feel that",
    "My neighbour's garden has",
    "The train this morning was",
    "Cooking dinner after a long day is",
    "The book I am reading right now is about",
    "Last weekend I went to the market and",
    "Our team meeting this afternoon",
    "The city looks different in the evening because",
    "I just got a message from an old friend who",
    "Walking the dog in the rain is",
    "The new cafe on the corner serves",
    "My plans for the holidays are",
    "The movie we watched last night was",
    "Learning to play the guitar has been",
    "The house is quiet now that",
    "Every morning I start the day by",
    "The report I have to finish by Friday",
    "The children at the park were",
    "Moving to a new apartment means",
    "The concert tickets finally arrived and",
    "Sunday afternoons usually feel",
    "My grandmother's recipe for soup",
    "The bus was late again, so",
    "Looking back at this year, I would say",
    "The painting in the hallway shows",
    "When the phone rang at midnight,",
    "The test results came back and",
    "Spring in this town always brings",
    "I ran into my teacher at the shop and",
    "The long drive to the coast was",
    "Our cat spends most of the day",
    "The library downstairs is",
    "I tried a new recipe tonight and it",
    "The hiking trail up the hill",
    "My brother called to tell me that",
    "The office feels different on Mondays because",
    "The first snow of the winter",
    "I have been thinking about the future and",
    "The old bicycle in the garage",
    "At the birthday party yesterday,",
    "The sound of the sea at night",
    "My computer crashed this morning, and",
    "The garden needs watering, and",
    "The photos from our trip show",
    "Waiting at the doctor's office,",
    "The song on the radio reminded me of",
    "Our small village has",
    "The project we started in March",
    "I opened the window and noticed",
]

HELD_OUT_PROMPTS = [
    "Describe your ideal weekend.",
    "How was your day?",
    "Tell me about your favourite food.",
    "What do you think about Mondays?",
    "Write two sentences about the ocean.",
    "What is your opinion of rainy days?",
    "Describe a walk in the city.",
    "How do you feel about your work?",
    "Tell me about your neighbourhood.",
    "What did you do last summer?",
    "Describe your morning routine.",
    "What do you think of winter?",
    "Tell me about a friend of yours.",
    "Describe the house you live in.",
    "How do you feel about the future?",
    "Write a short note to a colleague.",
    "What is it like to travel by train?",
    "Describe a meal you cooked recently.",
    "Tell me about a book you read.",
    "What do you think about birthdays?",
    "Describe the view from your window.",
    "How do you spend your evenings?",
    "Tell me about your last holiday.",
    "What do you think about cats?",
]
