import dataclasses

from schemas import Product
from streams.catalogue import read_catalogue
from streams.producer import create_producer
from streams.replay import publish
from streams.topics import ensure_topics

P = Product(product_id="p1", title="Kettle", category_path=("Home", "Kitchen"), price=20.0, created_at=1.7e9)


async def test_the_latest_record_of_each_product_wins(fresh):
    s = fresh()
    await ensure_topics(s)
    producer = create_producer(s)
    await producer.start()
    try:
        await publish(producer, s.topic("catalogue"), [P, dataclasses.replace(P, product_id="p2"),
                                                       dataclasses.replace(P, price=25.0, in_stock=False)],
                      progress=False)
        await producer.send_and_wait(s.topic("catalogue"), b"{broken", key=b"p3")
    finally:
        await producer.stop()
    products, refused = await read_catalogue(s)
    by_id = {p.product_id: p for p in products}
    assert set(by_id) == {"p1", "p2"} and by_id["p1"].price == 25.0 and not by_id["p1"].in_stock and refused == 1
